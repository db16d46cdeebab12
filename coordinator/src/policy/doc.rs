//! The access policy document: JSON with comments and trailing commas
//! (parsed with `jsonc-parser`, which keeps positions), read into typed
//! sections, every name it uses checked, every error naming its line.
//!
//! ```jsonc
//! {
//!   "groups": { "group:ops": ["alice", "group:oncall"] },
//!   "tags":   { "tag:gpu": ["group:ops"] },          // who may assign it
//!   "hosts":  { "nas": "100.64.0.9" },
//!   "acls": [
//!     { "action": "accept", "src": ["group:ops"], "dst": ["tag:gpu:8421"], "proto": "tcp" },
//!   ],
//!   "tests": [ { "src": "alice", "accept": ["tag:gpu:8421"], "deny": ["tag:gpu:22"] } ],
//! }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use jsonc_parser::ast::{Object, ObjectProp, Value};
use jsonc_parser::common::Ranged;
use jsonc_parser::{CollectOptions, ParseOptions};
use platform::addr::IpPrefix;
use platform::filter::{parse_ports, PortRange, Proto};

/// The largest policy document accepted.
pub const MAX_POLICY_BYTES: usize = 256 * 1024;
/// The most rules, tests, groups, tags or hosts one document may hold.
pub const MAX_ENTRIES: usize = 10_000;

/// The policy of a network that has not set one: members and admins reach
/// each other's devices; guests reach nothing (and nothing reaches them).
pub const DEFAULT_POLICY: &str = r#"// The default policy: members (admins included) reach every port of each
// other's devices; guests reach nothing unless a rule says so.
{
  "acls": [
    { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"] },
  ],
}
"#;

/// Why a document was refused, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct PolicyError {
    /// 1-based; 0 when the error is about the document as a whole.
    pub line: usize,
    pub message: String,
}

impl PolicyError {
    pub(crate) fn at(line: usize, message: impl Into<String>) -> Self {
        PolicyError {
            line,
            message: message.into(),
        }
    }
}

/// Whom a rule or test names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// `*`: every device and every address.
    All,
    /// A user's untagged devices.
    User(String),
    /// The untagged devices of a group's users (`group:NAME`).
    Group(String),
    /// Devices with this tag (`tag:NAME`).
    Tag(String),
    /// Addresses: a CIDR, an address, or a `hosts` name.
    Prefix(IpPrefix),
    /// Untagged devices of members and admins.
    Member,
    /// Untagged devices of admins.
    Admin,
    /// Untagged devices of guests.
    Guest,
    /// As a destination only: the source user's own untagged devices.
    SelfDevices,
}

/// One destination of a rule: whom, and which ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub selector: Selector,
    pub ports: Vec<PortRange>,
}

/// One accept rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    pub line: usize,
    pub src: Vec<Selector>,
    pub dst: Vec<Destination>,
    /// Empty: TCP, UDP and ICMP.
    pub protos: Vec<Proto>,
}

/// One assertion of the `tests` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTest {
    pub line: usize,
    pub src: String,
    pub proto: Proto,
    pub accept: Vec<(usize, String)>,
    pub deny: Vec<(usize, String)>,
}

/// A parsed and checked policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Group → its users (nested groups already expanded).
    pub groups: BTreeMap<String, BTreeSet<String>>,
    /// Tag → who may assign it (users; `autogroup:admin` is implied).
    pub tag_owners: BTreeMap<String, BTreeSet<String>>,
    pub hosts: BTreeMap<String, IpPrefix>,
    pub acls: Vec<Acl>,
    pub tests: Vec<PolicyTest>,
    /// Every plain name the document takes for a user, with its line: a
    /// name that is no member's is a typo (or a host missing from
    /// `hosts`), refused at upload by [`Policy::check_users`].
    pub users_named: Vec<(usize, String)>,
}

impl Policy {
    /// Refuses names that are neither a member of the network nor a host.
    pub fn check_users(&self, is_member: impl Fn(&str) -> bool) -> Result<(), PolicyError> {
        match self.users_named.iter().find(|(_, u)| !is_member(u)) {
            Some((line, u)) => Err(PolicyError::at(
                *line,
                format!("{u:?} is neither a member of the network nor a host"),
            )),
            None => Ok(()),
        }
    }
}

/// How deep groups may nest.
pub const MAX_GROUP_DEPTH: usize = 16;
/// The most users all groups and tag owners may hold once nested groups
/// are expanded (a few kilobytes of groups naming each other could
/// otherwise expand to millions).
pub const MAX_EXPANDED: usize = 100_000;

/// Parsing state: where each line starts (for line numbers).
struct Doc {
    newlines: Vec<usize>,
}

impl Doc {
    fn new(text: &str) -> Self {
        Doc {
            newlines: text
                .bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        }
    }

    fn line(&self, pos: usize) -> usize {
        self.newlines.partition_point(|&n| n < pos) + 1
    }

    fn err(&self, node: &impl Ranged, message: impl Into<String>) -> PolicyError {
        PolicyError::at(self.line(node.start()), message)
    }

    fn object<'a, 'b>(&self, v: &'b Value<'a>, what: &str) -> Result<&'b Object<'a>, PolicyError> {
        match v {
            Value::Object(o) => Ok(o),
            other => Err(self.err(other, format!("{what} must be an object"))),
        }
    }

    fn string<'b>(&self, v: &'b Value<'_>, what: &str) -> Result<&'b str, PolicyError> {
        match v {
            Value::StringLit(s) => Ok(&s.value),
            other => Err(self.err(other, format!("{what} must be a string"))),
        }
    }

    /// An array of strings, each with its line.
    fn strings(&self, v: &Value<'_>, what: &str) -> Result<Vec<(usize, String)>, PolicyError> {
        let Value::Array(a) = v else {
            return Err(self.err(v, format!("{what} must be an array of strings")));
        };
        if a.elements.len() > MAX_ENTRIES {
            return Err(self.err(v, format!("{what} has more than {MAX_ENTRIES} entries")));
        }
        a.elements
            .iter()
            .map(|e| Ok((self.line(e.start()), self.string(e, what)?.to_owned())))
            .collect()
    }

    /// Properties of an object, refusing duplicates and too many.
    fn props<'a, 'b>(
        &self,
        o: &'b Object<'a>,
        what: &str,
    ) -> Result<Vec<(&'b str, &'b ObjectProp<'a>)>, PolicyError> {
        if o.properties.len() > MAX_ENTRIES {
            return Err(self.err(o, format!("{what} has more than {MAX_ENTRIES} entries")));
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(o.properties.len());
        for p in &o.properties {
            let name = p.name.as_str();
            if !seen.insert(name) {
                return Err(self.err(p, format!("{what}: {name:?} is given twice")));
            }
            out.push((name, p));
        }
        Ok(out)
    }
}

/// Parses and checks a policy document.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::at(
            0,
            format!(
                "the policy is {} bytes; at most {MAX_POLICY_BYTES}",
                text.len()
            ),
        ));
    }
    let options = ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
    };
    let parsed = jsonc_parser::parse_to_ast(text, &CollectOptions::default(), &options)
        .map_err(|e| PolicyError::at(e.line_display(), e.kind().to_string()))?;
    let doc = Doc::new(text);
    let Some(root) = parsed.value else {
        return Err(PolicyError::at(0, "the policy is empty"));
    };
    let root = doc.object(&root, "the policy")?;
    let mut sections: BTreeMap<&str, &Value> = BTreeMap::new();
    for (name, prop) in doc.props(root, "the policy")? {
        match name {
            "groups" | "tags" | "hosts" | "acls" | "tests" => {
                sections.insert(name, &prop.value);
            }
            other => {
                return Err(doc.err(
                    prop,
                    format!("unknown section {other:?} (groups, tags, hosts, acls, tests)"),
                ))
            }
        }
    }
    let mut policy = Policy::default();
    let raw_groups = match sections.get("groups") {
        Some(v) => raw_groups(&doc, v)?,
        None => BTreeMap::new(),
    };
    policy.groups = expand_groups(&raw_groups)?;
    for (_, entries) in raw_groups.values() {
        for (line, e) in entries {
            if !e.starts_with("group:") {
                policy.users_named.push((*line, e.clone()));
            }
        }
    }
    if let Some(v) = sections.get("hosts") {
        for (name, prop) in doc.props(doc.object(v, "hosts")?, "hosts")? {
            if name.contains(':') || name == "*" || name.is_empty() {
                return Err(doc.err(prop, format!("host name {name:?} is not a plain name")));
            }
            let text = doc.string(&prop.value, "a host")?;
            let prefix = parse_prefix(text).ok_or_else(|| {
                doc.err(&prop.value, format!("{text:?} is not an address or CIDR"))
            })?;
            policy.hosts.insert(name.to_owned(), prefix);
        }
    }
    if let Some(v) = sections.get("tags") {
        let mut expanded_owners = 0usize;
        for (name, prop) in doc.props(doc.object(v, "tags")?, "tags")? {
            if !valid_tag(name) {
                return Err(doc.err(prop, format!("tag {name:?} must look like tag:NAME")));
            }
            let mut owners = BTreeSet::new();
            for (line, owner) in doc.strings(&prop.value, "a tag's owners")? {
                match owner.as_str() {
                    "autogroup:admin" => {}
                    g if g.starts_with("group:") => {
                        if expanded_owners > MAX_EXPANDED {
                            return Err(PolicyError::at(
                                line,
                                format!(
                                    "tag owners expand to more than {MAX_EXPANDED} users in all"
                                ),
                            ));
                        }
                        let users = policy.groups.get(g).ok_or_else(|| {
                            PolicyError::at(
                                line,
                                format!("unknown group {g:?} among the owners of {name}"),
                            )
                        })?;
                        expanded_owners += users.len();
                        owners.extend(users.iter().cloned());
                    }
                    u if valid_username(u) => {
                        owners.insert(u.to_owned());
                        policy.users_named.push((line, u.to_owned()));
                    }
                    other => {
                        return Err(PolicyError::at(
                            line,
                            format!(
                                "{other:?} cannot own a tag (a user, a group or autogroup:admin)"
                            ),
                        ))
                    }
                }
            }
            policy.tag_owners.insert(name.to_owned(), owners);
        }
    }
    if let Some(v) = sections.get("acls") {
        let Value::Array(a) = v else {
            return Err(doc.err(*v, "acls must be an array of rules"));
        };
        if a.elements.len() > MAX_ENTRIES {
            return Err(doc.err(*v, format!("more than {MAX_ENTRIES} rules")));
        }
        for rule in &a.elements {
            let mut users = Vec::new();
            let acl = parse_acl(&doc, &policy, rule, &mut users)?;
            policy.users_named.extend(users);
            policy.acls.push(acl);
        }
    }
    if let Some(v) = sections.get("tests") {
        let Value::Array(a) = v else {
            return Err(doc.err(*v, "tests must be an array"));
        };
        if a.elements.len() > MAX_ENTRIES {
            return Err(doc.err(*v, format!("more than {MAX_ENTRIES} tests")));
        }
        for t in &a.elements {
            let mut users = Vec::new();
            let test = parse_test(&doc, &policy, t, &mut users)?;
            policy.users_named.extend(users);
            policy.tests.push(test);
        }
    }
    Ok(policy)
}

/// `groups` as written: group → (line, its entries with their lines).
type RawGroups = BTreeMap<String, (usize, Vec<(usize, String)>)>;

fn raw_groups(doc: &Doc, v: &Value<'_>) -> Result<RawGroups, PolicyError> {
    let mut out = BTreeMap::new();
    for (name, prop) in doc.props(doc.object(v, "groups")?, "groups")? {
        if !name.starts_with("group:") || name.len() == "group:".len() {
            return Err(doc.err(prop, format!("group {name:?} must look like group:NAME")));
        }
        let entries = doc.strings(&prop.value, "a group")?;
        for (line, e) in &entries {
            if !e.starts_with("group:") && !valid_username(e) {
                return Err(PolicyError::at(
                    *line,
                    format!("{e:?} in {name} is neither a user nor a group"),
                ));
            }
        }
        out.insert(name.to_owned(), (doc.line(prop.start()), entries));
    }
    Ok(out)
}

/// Expands nested groups into sets of users, refusing unknown groups and
/// cycles (naming the line of the group that closes the cycle).
fn expand_groups(raw: &RawGroups) -> Result<BTreeMap<String, BTreeSet<String>>, PolicyError> {
    fn visit(
        name: &str,
        raw: &RawGroups,
        done: &mut BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
    ) -> Result<BTreeSet<String>, PolicyError> {
        if let Some(users) = done.get(name) {
            return Ok(users.clone());
        }
        let (line, entries) = &raw[name];
        if path.iter().any(|p| p == name) {
            path.push(name.to_owned());
            return Err(PolicyError::at(
                *line,
                format!("groups form a cycle: {}", path.join(" → ")),
            ));
        }
        path.push(name.to_owned());
        if path.len() > MAX_GROUP_DEPTH {
            return Err(PolicyError::at(
                *line,
                format!(
                    "groups nest deeper than {MAX_GROUP_DEPTH}: {}",
                    path.join(" → ")
                ),
            ));
        }
        let mut users = BTreeSet::new();
        for (eline, e) in entries {
            if e.starts_with("group:") {
                if !raw.contains_key(e.as_str()) {
                    return Err(PolicyError::at(
                        *eline,
                        format!("unknown group {e:?} in {name}"),
                    ));
                }
                users.extend(visit(e, raw, done, path)?);
            } else {
                users.insert(e.clone());
            }
        }
        path.pop();
        let total: usize = done.values().map(BTreeSet::len).sum::<usize>() + users.len();
        if total > MAX_EXPANDED {
            return Err(PolicyError::at(
                *line,
                format!("groups expand to more than {MAX_EXPANDED} members in all"),
            ));
        }
        done.insert(name.to_owned(), users.clone());
        Ok(users)
    }
    let mut done = BTreeMap::new();
    for name in raw.keys() {
        visit(name, raw, &mut done, &mut Vec::new())?;
    }
    Ok(done)
}

fn parse_acl(
    doc: &Doc,
    policy: &Policy,
    v: &Value<'_>,
    users: &mut Vec<(usize, String)>,
) -> Result<Acl, PolicyError> {
    let line = doc.line(v.start());
    let o = doc.object(v, "a rule")?;
    let (mut src, mut dst, mut protos) = (None, None, Vec::new());
    for (name, prop) in doc.props(o, "a rule")? {
        match name {
            "action" => {
                let a = doc.string(&prop.value, "action")?;
                if a != "accept" {
                    return Err(doc.err(prop, format!("action {a:?}: rules only accept")));
                }
            }
            "src" => {
                let mut out = Vec::new();
                for (l, s) in doc.strings(&prop.value, "src")? {
                    let sel = selector(policy, &s).map_err(|m| PolicyError::at(l, m))?;
                    if let Selector::User(u) = &sel {
                        users.push((l, u.clone()));
                    }
                    if sel == Selector::SelfDevices {
                        return Err(PolicyError::at(l, "autogroup:self is a destination only"));
                    }
                    out.push(sel);
                }
                src = Some(out);
            }
            "dst" => {
                let mut out = Vec::new();
                for (l, s) in doc.strings(&prop.value, "dst")? {
                    let d = destination(policy, &s).map_err(|m| PolicyError::at(l, m))?;
                    if let Selector::User(u) = &d.selector {
                        users.push((l, u.clone()));
                    }
                    out.push(d);
                }
                dst = Some(out);
            }
            "proto" => {
                let p = doc.string(&prop.value, "proto")?;
                protos = vec![p.parse().map_err(|m: String| doc.err(&prop.value, m))?];
            }
            other => {
                return Err(doc.err(
                    prop,
                    format!("unknown field {other:?} in a rule (action, src, dst, proto)"),
                ))
            }
        }
    }
    let src = src.ok_or_else(|| PolicyError::at(line, "a rule needs src"))?;
    let dst = dst.ok_or_else(|| PolicyError::at(line, "a rule needs dst"))?;
    Ok(Acl {
        line,
        src,
        dst,
        protos,
    })
}

fn parse_test(
    doc: &Doc,
    policy: &Policy,
    v: &Value<'_>,
    users: &mut Vec<(usize, String)>,
) -> Result<PolicyTest, PolicyError> {
    let line = doc.line(v.start());
    let o = doc.object(v, "a test")?;
    let mut test = PolicyTest {
        line,
        src: String::new(),
        proto: Proto::Tcp,
        accept: Vec::new(),
        deny: Vec::new(),
    };
    for (name, prop) in doc.props(o, "a test")? {
        match name {
            "src" => {
                let s = doc.string(&prop.value, "a test's src")?;
                if let Identity::User(u) =
                    identity(policy, s).map_err(|m| doc.err(&prop.value, m))?
                {
                    users.push((doc.line(prop.value.start()), u));
                }
                s.clone_into(&mut test.src);
            }
            "proto" => {
                let p = doc.string(&prop.value, "proto")?;
                test.proto = p.parse().map_err(|m: String| doc.err(&prop.value, m))?;
            }
            "accept" | "deny" => {
                let list = doc.strings(&prop.value, name)?;
                for (l, d) in &list {
                    let (host, port) = split_host_port(d).map_err(|m| PolicyError::at(*l, m))?;
                    if let Identity::User(u) =
                        identity(policy, host).map_err(|m| PolicyError::at(*l, m))?
                    {
                        users.push((*l, u));
                    }
                    let ports = parse_ports(port).map_err(|m| PolicyError::at(*l, m))?;
                    if ports.len() != 1 || ports[0].first != ports[0].last {
                        return Err(PolicyError::at(*l, format!("{d:?}: a test names one port")));
                    }
                }
                if name == "accept" {
                    test.accept = list;
                } else {
                    test.deny = list;
                }
            }
            other => {
                return Err(doc.err(
                    prop,
                    format!("unknown field {other:?} in a test (src, proto, accept, deny)"),
                ))
            }
        }
    }
    if test.src.is_empty() {
        return Err(PolicyError::at(line, "a test needs src"));
    }
    Ok(test)
}

/// Whom a test's `src` or destination host is: one identity, not a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    User(String),
    Tag(String),
    Address(IpAddr),
}

pub(crate) fn identity(policy: &Policy, s: &str) -> Result<Identity, String> {
    match selector(policy, s)? {
        Selector::User(u) => Ok(Identity::User(u)),
        Selector::Tag(t) => Ok(Identity::Tag(t)),
        Selector::Prefix(p) if p.len == IpPrefix::host(p.addr).len => Ok(Identity::Address(p.addr)),
        _ => Err(format!(
            "{s:?}: a test names one user, tag, host or address, not a set"
        )),
    }
}

/// Parses one selector, checking that the group, tag or host it names exists.
pub(crate) fn selector(policy: &Policy, s: &str) -> Result<Selector, String> {
    if s == "*" {
        return Ok(Selector::All);
    }
    if let Some(a) = s.strip_prefix("autogroup:") {
        return match a {
            "member" => Ok(Selector::Member),
            "admin" => Ok(Selector::Admin),
            "guest" => Ok(Selector::Guest),
            "self" => Ok(Selector::SelfDevices),
            _ => Err(format!(
                "unknown autogroup {s:?} (autogroup:member, admin, guest or self)"
            )),
        };
    }
    if s.starts_with("group:") {
        return if policy.groups.contains_key(s) {
            Ok(Selector::Group(s.to_owned()))
        } else {
            Err(format!("unknown group {s:?}"))
        };
    }
    if s.starts_with("tag:") {
        return if policy.tag_owners.contains_key(s) {
            Ok(Selector::Tag(s.to_owned()))
        } else {
            Err(format!("unknown tag {s:?} (declare it under \"tags\")"))
        };
    }
    if let Some(p) = policy.hosts.get(s) {
        return Ok(Selector::Prefix(*p));
    }
    if let Some(p) = parse_prefix(s) {
        return Ok(Selector::Prefix(p));
    }
    if valid_username(s) {
        return Ok(Selector::User(s.to_owned()));
    }
    Err(format!("unknown selector {s:?}"))
}

fn destination(policy: &Policy, s: &str) -> Result<Destination, String> {
    let (host, ports) = split_host_port(s)?;
    Ok(Destination {
        selector: selector(policy, host)?,
        ports: parse_ports(ports).map_err(|e| format!("{s:?}: {e}"))?,
    })
}

/// Splits `HOST:PORTS` at the last colon (`[v6]:PORTS` also works).
pub(crate) fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((host, ports)) = rest.split_once("]:") {
            return Ok((host, ports));
        }
    }
    match s.rsplit_once(':') {
        Some((host, ports)) if !host.is_empty() => Ok((host, ports)),
        _ => Err(format!(
            "{s:?} must be HOST:PORTS (e.g. tag:gpu:8421 or *:*)"
        )),
    }
}

fn parse_prefix(s: &str) -> Option<IpPrefix> {
    if s.contains('/') {
        s.parse::<IpPrefix>().ok().map(|p| p.network())
    } else {
        s.parse::<IpAddr>().ok().map(IpPrefix::host)
    }
}

fn valid_tag(s: &str) -> bool {
    s.strip_prefix("tag:").is_some_and(|t| {
        !t.is_empty()
            && t.len() <= 63
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    })
}

/// The shape of usernames (see the people store): letters, digits, `.`,
/// `_`, `-`, starting with a letter or digit, at most 32.
fn valid_username(s: &str) -> bool {
    crate::store::people::validate_username(s).is_ok()
}
