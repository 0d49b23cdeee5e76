//! Any bytes as a business's stored key state, the first byte choosing the
//! record (`00` identity, `01` signed prekey, `02` one-time prekey, `03`
//! local provider blob, `04` wrapped key blob): no decoder panics, each
//! refuses with the error it promises, and what decodes encodes back (the
//! blobs to exactly the input; the library's protobuf records to a normal
//! form that encoding keeps) (checks in `custodian::fuzzing::key_records`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custodian::fuzzing::key_records(data);
});
