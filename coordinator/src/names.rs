//! Device names: DNS labels derived from hostnames, unique per network.

/// Turns a hostname into a DNS label: lowercase ASCII letters, digits and
/// inner hyphens, at most 63 characters; `device` when nothing is left.
pub fn dns_label(hostname: &str) -> String {
    let first = hostname.split('.').next().unwrap_or("");
    let mut out = String::with_capacity(first.len());
    for c in first.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.truncate(63);
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("device");
    }
    out
}

/// The first of `base`, `base-2`, `base-3`, … that `taken` does not hold.
pub fn unique_name(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_owned();
    }
    (2u32..)
        .map(|n| {
            let suffix = format!("-{n}");
            let mut stem = base.to_owned();
            stem.truncate(63 - suffix.len());
            format!("{stem}{suffix}")
        })
        .find(|c| !taken(c))
        .expect("some suffix is free")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels() {
        assert_eq!(dns_label("My Laptop.local"), "my-laptop");
        assert_eq!(dns_label("--x__y--"), "x-y");
        assert_eq!(dns_label("ümlaut"), "mlaut");
        assert_eq!(dns_label(""), "device");
        assert_eq!(dns_label(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn suffixes() {
        let taken = ["box", "box-2"];
        assert_eq!(unique_name("box", |n| taken.contains(&n)), "box-3");
        assert_eq!(unique_name("other", |n| taken.contains(&n)), "other");
    }

    proptest! {
        #[test]
        fn label_is_always_valid(s in ".{0,100}") {
            let l = dns_label(&s);
            prop_assert!(!l.is_empty() && l.len() <= 63);
            prop_assert!(l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            prop_assert!(!l.starts_with('-') && !l.ends_with('-'));
        }
    }
}
