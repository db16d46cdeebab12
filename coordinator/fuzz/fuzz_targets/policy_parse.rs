//! Access policy documents (JSON with comments, as an admin uploads them):
//! parsing, checking and compiling against a small network must never
//! panic, and whatever compiles must agree with itself (seeing each other
//! is symmetric). Seeds are in `corpus/policy_parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coordinator::policy::fuzz_policy(data);
});
