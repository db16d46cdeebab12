//! Requests signed with a device key.
//!
//! The signature covers `domain || 0x00 || payload`, where `payload` is the
//! exact JSON text carried in the envelope and `domain` names what the request
//! is for, so a signature made for one purpose is never valid for another.
//! Payloads carry a timestamp; the receiver rejects stale ones.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::keys::{DevicePrivate, DevicePublic};

/// Domain of a device registration.
pub const DOMAIN_REGISTER: &str = "crank-mesh/register/v1";
/// Domain of the hello that opens a map stream.
pub const DOMAIN_MAP: &str = "crank-mesh/map/v1";
/// Domain of device-code pairing requests.
pub const DOMAIN_DEVICE_CODE: &str = "crank-mesh/device-code/v1";
/// Domain of a node-key rotation.
pub const DOMAIN_ROTATE: &str = "crank-mesh/rotate-key/v1";

/// How far a signed timestamp may be from the receiver's clock.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// A JSON payload with the device key that signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub device_key: DevicePublic,
    /// The payload's JSON text, exactly as signed.
    pub payload: String,
    /// Ed25519 signature, hex.
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    #[error("signature is not 64 bytes of hex")]
    MalformedSignature,
    #[error("signature does not verify for this device key")]
    BadSignature,
    #[error("payload is not valid: {0}")]
    BadPayload(String),
    #[error("request timestamp is {0} s away from the server's clock")]
    Stale(u64),
}

/// Anything signed carries the time it was made.
pub trait Timestamped {
    fn timestamp(&self) -> u64;
}

fn message(domain: &str, payload: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + payload.len());
    m.extend_from_slice(domain.as_bytes());
    m.push(0);
    m.extend_from_slice(payload.as_bytes());
    m
}

impl Signed {
    pub fn sign<T: Serialize>(key: &DevicePrivate, domain: &str, payload: &T) -> Self {
        let payload = serde_json::to_string(payload).expect("payload types serialize");
        let signature = hex::encode(key.sign(&message(domain, &payload)));
        Signed {
            device_key: key.public(),
            payload,
            signature,
        }
    }

    /// Checks the signature for `domain`, then the payload's shape and age.
    pub fn verify<T: DeserializeOwned + Timestamped>(
        &self,
        domain: &str,
        now_unix: u64,
    ) -> Result<T, SignedError> {
        let value: T = self.open(domain)?;
        let skew = now_unix.abs_diff(value.timestamp());
        if skew > MAX_CLOCK_SKEW_SECS {
            return Err(SignedError::Stale(skew));
        }
        Ok(value)
    }

    /// Checks the signature for `domain` and the payload's shape, at any
    /// age: for records kept and checked later (job tickets inside
    /// receipts delivered after an outage), whose freshness the caller
    /// judges by their own fields.
    pub fn open<T: DeserializeOwned>(&self, domain: &str) -> Result<T, SignedError> {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig)
            .map_err(|_| SignedError::MalformedSignature)?;
        if !self
            .device_key
            .verify(&message(domain, &self.payload), &sig)
        {
            return Err(SignedError::BadSignature);
        }
        serde_json::from_str(&self.payload).map_err(|e| SignedError::BadPayload(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        timestamp: u64,
        text: String,
    }
    impl Timestamped for Ping {
        fn timestamp(&self) -> u64 {
            self.timestamp
        }
    }

    #[test]
    fn domain_separation() {
        let k = DevicePrivate::generate();
        let s = Signed::sign(
            &k,
            DOMAIN_REGISTER,
            &Ping {
                timestamp: 100,
                text: "x".into(),
            },
        );
        assert!(s.verify::<Ping>(DOMAIN_REGISTER, 100).is_ok());
        assert_eq!(
            s.verify::<Ping>(DOMAIN_MAP, 100),
            Err(SignedError::BadSignature)
        );
    }

    #[test]
    fn tampering_and_staleness() {
        let k = DevicePrivate::generate();
        let mut s = Signed::sign(
            &k,
            DOMAIN_MAP,
            &Ping {
                timestamp: 1000,
                text: "x".into(),
            },
        );
        assert_eq!(
            s.verify::<Ping>(DOMAIN_MAP, 2000),
            Err(SignedError::Stale(1000))
        );
        s.payload = s.payload.replace("\"x\"", "\"y\"");
        assert_eq!(
            s.verify::<Ping>(DOMAIN_MAP, 1000),
            Err(SignedError::BadSignature)
        );
        s.signature = "abc".into();
        assert_eq!(
            s.verify::<Ping>(DOMAIN_MAP, 1000),
            Err(SignedError::MalformedSignature)
        );
        let other = DevicePrivate::generate();
        let mut s = Signed::sign(
            &k,
            DOMAIN_MAP,
            &Ping {
                timestamp: 1000,
                text: "x".into(),
            },
        );
        s.device_key = other.public();
        assert_eq!(
            s.verify::<Ping>(DOMAIN_MAP, 1000),
            Err(SignedError::BadSignature)
        );
    }

    proptest! {
        #[test]
        fn envelope_round_trips(text in ".{0,40}", ts in 0u64..1 << 40) {
            let k = DevicePrivate::generate();
            let p = Ping { timestamp: ts, text };
            let s = Signed::sign(&k, DOMAIN_REGISTER, &p);
            let json = serde_json::to_string(&s).unwrap();
            let back: Signed = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.verify::<Ping>(DOMAIN_REGISTER, ts).unwrap(), p);
        }
    }
}
