//! Key types of a Crank Mesh network.
//!
//! * node key: X25519, the WireGuard static key of a device;
//! * disco key: X25519, seals path-discovery messages;
//! * device key: Ed25519, signs registration and map-stream requests;
//! * coordinator key: Ed25519, signs what the coordinator hands out.
//!
//! Public keys have a text form with a prefix (`nodekey:<hex>`), which is also
//! their serde form. Private keys print only their public half in `Debug` so a
//! secret never reaches a log.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use rand_core::OsRng;

/// Why a key's text form could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("expected prefix `{expected}`")]
    WrongPrefix { expected: &'static str },
    #[error("key is not 64 hex digits")]
    BadHex,
    #[error("key is not 32 bytes of base64")]
    BadBase64,
    #[error("not a valid Ed25519 public key")]
    NotOnCurve,
}

fn parse_prefixed(s: &str, prefix: &'static str) -> Result<[u8; 32], KeyParseError> {
    let hex_part = s
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(':'))
        .ok_or(KeyParseError::WrongPrefix { expected: prefix })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| KeyParseError::BadHex)?;
    Ok(out)
}

/// Defines serde as the type's text form, through `Display` and `FromStr`.
macro_rules! serde_via_text {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Text form, `Debug` and serde of a public key type with `as_bytes()`,
/// and `Debug` + `FromStr` of its private counterpart.
macro_rules! key_text {
    ($public:ident, $private:ident, $pub_prefix:literal, $priv_prefix:literal) => {
        impl $public {
            /// First eight hex digits: enough to tell keys apart in logs.
            pub fn short(&self) -> String {
                hex::encode(&self.as_bytes()[..4])
            }
        }
        impl fmt::Display for $public {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}:{}", $pub_prefix, hex::encode(self.as_bytes()))
            }
        }
        impl fmt::Debug for $public {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}:{}…", $pub_prefix, self.short())
            }
        }
        serde_via_text!($public);

        impl fmt::Debug for $private {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(public {:?})", stringify!($private), self.public())
            }
        }
        impl FromStr for $private {
            type Err = KeyParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_prefixed(s, $priv_prefix).map(Self::from_bytes)
            }
        }
    };
}

/// An X25519 key pair family (node key, disco key).
macro_rules! x25519_keys {
    ($public:ident, $private:ident, $pub_prefix:literal, $priv_prefix:literal, $what:literal) => {
        #[doc = concat!("Public ", $what, " (X25519); text form `", $pub_prefix, ":<hex>`.")]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $public([u8; 32]);

        impl $public {
            pub const PREFIX: &'static str = $pub_prefix;

            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// The key as `x25519_dalek` wants it.
            pub fn to_dalek(&self) -> x25519_dalek::PublicKey {
                x25519_dalek::PublicKey::from(self.0)
            }
            /// Standard base64, as `wg` and wg-quick configs write keys.
            pub fn to_base64(&self) -> String {
                BASE64.encode(self.0)
            }
            pub fn from_base64(s: &str) -> Result<Self, KeyParseError> {
                let v = BASE64
                    .decode(s.trim())
                    .map_err(|_| KeyParseError::BadBase64)?;
                let bytes: [u8; 32] = v.try_into().map_err(|_| KeyParseError::BadBase64)?;
                Ok(Self(bytes))
            }
        }

        impl FromStr for $public {
            type Err = KeyParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_prefixed(s, $pub_prefix).map(Self)
            }
        }

        #[doc = concat!("Private ", $what, " (X25519). `Debug` shows only the public half.")]
        #[derive(Clone)]
        pub struct $private(x25519_dalek::StaticSecret);

        impl $private {
            pub const PREFIX: &'static str = $priv_prefix;

            pub fn generate() -> Self {
                Self(x25519_dalek::StaticSecret::random_from_rng(OsRng))
            }
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(x25519_dalek::StaticSecret::from(bytes))
            }
            pub fn public(&self) -> $public {
                $public(x25519_dalek::PublicKey::from(&self.0).to_bytes())
            }
            pub fn to_dalek(&self) -> x25519_dalek::StaticSecret {
                self.0.clone()
            }
            /// The secret in its text form, for the key file only.
            pub fn to_secret_text(&self) -> String {
                format!("{}:{}", $priv_prefix, hex::encode(self.0.to_bytes()))
            }
            /// Reads a private key as `wg genkey` writes it.
            pub fn from_base64(s: &str) -> Result<Self, KeyParseError> {
                let v = BASE64
                    .decode(s.trim())
                    .map_err(|_| KeyParseError::BadBase64)?;
                let bytes: [u8; 32] = v.try_into().map_err(|_| KeyParseError::BadBase64)?;
                Ok(Self::from_bytes(bytes))
            }
        }
        key_text!($public, $private, $pub_prefix, $priv_prefix);
    };
}

x25519_keys!(NodePublic, NodePrivate, "nodekey", "privkey", "node key");
x25519_keys!(
    ProofPublic,
    ProofPrivate,
    "proofkey",
    "proofpriv",
    "coordinator proof key"
);
x25519_keys!(
    DiscoPublic,
    DiscoPrivate,
    "discokey",
    "discopriv",
    "disco key"
);

/// An Ed25519 key pair family (device key, coordinator key).
macro_rules! ed25519_keys {
    ($public:ident, $private:ident, $pub_prefix:literal, $priv_prefix:literal, $what:literal) => {
        #[doc = concat!("Public ", $what, " (Ed25519); text form `", $pub_prefix, ":<hex>`.")]
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $public(ed25519_dalek::VerifyingKey);

        impl $public {
            pub const PREFIX: &'static str = $pub_prefix;

            pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyParseError> {
                ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                    .map(Self)
                    .map_err(|_| KeyParseError::NotOnCurve)
            }
            pub fn as_bytes(&self) -> &[u8; 32] {
                self.0.as_bytes()
            }
            /// Checks `signature` over `message` (strict: no malleable signatures).
            pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
                let sig = ed25519_dalek::Signature::from_bytes(signature);
                self.0.verify_strict(message, &sig).is_ok()
            }
        }
        impl FromStr for $public {
            type Err = KeyParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::from_bytes(parse_prefixed(s, $pub_prefix)?)
            }
        }

        #[doc = concat!("Private ", $what, " (Ed25519). `Debug` shows only the public half.")]
        #[derive(Clone)]
        pub struct $private(ed25519_dalek::SigningKey);

        impl $private {
            pub const PREFIX: &'static str = $priv_prefix;

            pub fn generate() -> Self {
                Self(ed25519_dalek::SigningKey::generate(&mut OsRng))
            }
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(ed25519_dalek::SigningKey::from_bytes(&bytes))
            }
            pub fn public(&self) -> $public {
                $public(self.0.verifying_key())
            }
            pub fn sign(&self, message: &[u8]) -> [u8; 64] {
                self.0.sign(message).to_bytes()
            }
            pub fn to_secret_text(&self) -> String {
                format!("{}:{}", $priv_prefix, hex::encode(self.0.to_bytes()))
            }
        }
        key_text!($public, $private, $pub_prefix, $priv_prefix);
    };
}

ed25519_keys!(
    DevicePublic,
    DevicePrivate,
    "devkey",
    "devpriv",
    "device key"
);
ed25519_keys!(
    CoordinatorPublic,
    CoordinatorPrivate,
    "coordkey",
    "coordpriv",
    "coordinator key"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn debug_never_shows_secrets() {
        let node = NodePrivate::generate();
        let secret_hex = node.to_secret_text();
        let secret_hex = secret_hex.split(':').nth(1).unwrap();
        let dbg = format!("{node:?}");
        assert!(!dbg.contains(secret_hex), "{dbg}");
        assert!(dbg.contains("nodekey:"), "{dbg}");

        let dev = DevicePrivate::generate();
        let secret = dev.to_secret_text();
        let dbg = format!("{dev:?}");
        assert!(!dbg.contains(secret.split(':').nth(1).unwrap()), "{dbg}");
    }

    #[test]
    fn wrong_prefix_is_rejected() {
        let k = NodePrivate::generate().public().to_string();
        let as_disco = k.replacen("nodekey", "discokey", 1);
        assert_eq!(
            as_disco.parse::<NodePublic>(),
            Err(KeyParseError::WrongPrefix {
                expected: "nodekey"
            })
        );
        assert_eq!(
            "nodekey:zz".parse::<NodePublic>(),
            Err(KeyParseError::BadHex)
        );
        assert!("nodekey".parse::<NodePublic>().is_err());
    }

    #[test]
    fn private_text_round_trips() {
        let n = NodePrivate::generate();
        let back: NodePrivate = n.to_secret_text().parse().unwrap();
        assert_eq!(back.public(), n.public());
        let d = DevicePrivate::generate();
        let back: DevicePrivate = d.to_secret_text().parse().unwrap();
        assert_eq!(back.public(), d.public());
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let d = DevicePrivate::generate();
        let sig = d.sign(b"hello");
        assert!(d.public().verify(b"hello", &sig));
        assert!(!d.public().verify(b"hellp", &sig));
        let other = DevicePrivate::generate();
        assert!(!other.public().verify(b"hello", &sig));
    }

    proptest! {
        #[test]
        fn node_key_text_and_base64_round_trip(bytes in any::<[u8; 32]>()) {
            let k = NodePublic::from_bytes(bytes);
            prop_assert_eq!(k.to_string().parse::<NodePublic>().unwrap(), k);
            prop_assert_eq!(NodePublic::from_base64(&k.to_base64()).unwrap(), k);
            let json = serde_json::to_string(&k).unwrap();
            prop_assert_eq!(serde_json::from_str::<NodePublic>(&json).unwrap(), k);
        }

        #[test]
        fn disco_key_round_trips(bytes in any::<[u8; 32]>()) {
            let k = DiscoPublic::from_bytes(bytes);
            prop_assert_eq!(k.to_string().parse::<DiscoPublic>().unwrap(), k);
        }

        #[test]
        fn device_key_round_trips(seed in any::<[u8; 32]>()) {
            let k = DevicePrivate::from_bytes(seed).public();
            prop_assert_eq!(k.to_string().parse::<DevicePublic>().unwrap(), k);
            let json = serde_json::to_string(&k).unwrap();
            prop_assert_eq!(serde_json::from_str::<DevicePublic>(&json).unwrap(), k);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,80}") {
            let _ = s.parse::<NodePublic>();
            let _ = s.parse::<DevicePublic>();
            let _ = NodePublic::from_base64(&s);
        }
    }
}
