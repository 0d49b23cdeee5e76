//! Any bytes: parsing never panics, and whatever parses serialises back to
//! exactly the input.
#![no_main]

use custodian::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::parse(data) {
        assert_eq!(envelope.to_bytes(), data, "parse then to_bytes must round-trip");
    }
});
