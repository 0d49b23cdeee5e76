//! The AEAD seam: the one place that names an AES-256-GCM implementation.
//!
//! Everything else calls [`Cipher`]; a hardware-speed backend (ring,
//! aws-lc-rs) can be added behind a cargo feature by implementing this small
//! surface, without touching any format. The backend must be AES-256-GCM with
//! 96-bit nonces and 128-bit tags appended to the ciphertext.

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

/// Key length in bytes.
pub(crate) const KEY_LEN: usize = 32;
/// Nonce length in bytes.
pub(crate) const NONCE_LEN: usize = 12;
/// Tag length in bytes.
pub(crate) const TAG_LEN: usize = 16;

/// The AEAD failed: wrong key, altered ciphertext, tag or associated data.
/// Deliberately carries nothing, so callers cannot leak why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AeadError;

/// An AES-256-GCM key schedule; the backend zeroizes it on drop (aes-gcm's
/// `zeroize` feature). Not boxed: a per-record cipher lives and dies on one
/// stack frame, and long-lived holders keep theirs behind an `Arc`, so
/// neither is moved after use. Building one moves it at least once (into
/// its `Arc`), and the copy left in the building frame is not wiped.
pub(crate) struct Cipher(Aes256Gcm);

impl Cipher {
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        Self(Aes256Gcm::new(key.into()))
    }

    /// Encrypt `plaintext`, appending ciphertext then tag to `out`.
    pub(crate) fn seal_into(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AeadError> {
        let start = out.len();
        out.resize(start + plaintext.len(), 0);
        let buf = InOutBuf::new(plaintext, &mut out[start..]).map_err(|_| AeadError)?;
        let tag = self
            .0
            .encrypt_inout_detached(&Nonce::from(*nonce), aad, buf)
            .map_err(|_| AeadError)?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// Encrypt `plaintext` with everything already in `out` as the associated
    /// data, appending ciphertext then tag: a header is authenticated where it
    /// was written, without a copy.
    pub(crate) fn seal_appending(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AeadError> {
        let aad_len = out.len();
        out.extend_from_slice(plaintext);
        self.seal_in_place(nonce, aad_len, out)
    }

    /// Encrypt `buf[aad_len..]` in place with `buf[..aad_len]` as the
    /// associated data, appending the tag.
    pub(crate) fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad_len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<(), AeadError> {
        let (aad, body) = buf.split_at_mut_checked(aad_len).ok_or(AeadError)?;
        let tag = self
            .0
            .encrypt_inout_detached(&Nonce::from(*nonce), aad, InOutBuf::from(body))
            .map_err(|_| AeadError)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Verify and decrypt `sealed` (ciphertext then tag) into a new buffer.
    /// Nothing is decrypted unless the tag verifies.
    pub(crate) fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, AeadError> {
        let split = sealed.len().checked_sub(TAG_LEN).ok_or(AeadError)?;
        let (ciphertext, tag) = sealed.split_at(split);
        let tag = Tag::try_from(tag).map_err(|_| AeadError)?;
        // Copy, then decrypt in place (as aes-gcm's own `decrypt` does): one
        // pass over fresh memory instead of zeroing it first. On failure the
        // buffer still holds only ciphertext.
        let mut out = ciphertext.to_vec();
        self.0
            .decrypt_inout_detached(
                &Nonce::from(*nonce),
                aad,
                InOutBuf::from(&mut out[..]),
                &tag,
            )
            .map_err(|_| AeadError)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // NIST SP 800-38D / McGrew-Viega test case 16 (AES-256, 60-byte plaintext, AAD).
    #[test]
    fn matches_the_gcm_spec_test_vector() {
        let key: [u8; 32] =
            hex::decode("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
                .unwrap()
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = hex::decode("cafebabefacedbaddecaf888")
            .unwrap()
            .try_into()
            .unwrap();
        let pt = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        )
        .unwrap();
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let expected = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
                        76fc6ece0f4e1768cddf8853bb2d551b";
        let cipher = Cipher::new(&key);
        let mut out = b"prefix".to_vec();
        cipher.seal_into(&nonce, &aad, &pt, &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(hex::encode(&out[6..]), expected);
        assert_eq!(cipher.open(&nonce, &aad, &out[6..]).unwrap(), pt);
        let mut bad = out[6..].to_vec();
        bad[0] ^= 1;
        assert_eq!(cipher.open(&nonce, &aad, &bad), Err(AeadError));
        assert_eq!(cipher.open(&nonce, b"", &out[6..]), Err(AeadError));
        assert_eq!(cipher.open(&nonce, &aad, &out[6..20]), Err(AeadError));
        assert_eq!(cipher.open(&nonce, &aad, &[]), Err(AeadError));
        let mut appended = aad.clone();
        cipher.seal_appending(&nonce, &pt, &mut appended).unwrap();
        assert_eq!(hex::encode(&appended[aad.len()..]), expected);
    }
}
