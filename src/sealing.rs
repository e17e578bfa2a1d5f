//! Secrets at rest: app secrets and tokens are sealed with ChaCha20-Poly1305
//! under a 256-bit master key kept in a file of its own (mode 0600, or a
//! systemd credential). Each sealed value is bound to where it belongs (its
//! column and row), so a value copied to another row does not open.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

/// Sealed values start with this, so that plaintext left from before sealing is recognised.
pub(crate) const SEALED_PREFIX: &str = "v1:";
const NONCE_LENGTH: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the master key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the master key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the master key file {path} does not hold 64 hexadecimal digits")]
    Malformed { path: PathBuf },
    #[error(
        "a sealed value does not open with this master key (wrong key, or the value was tampered with)"
    )]
    WrongKey,
}

/// The master key. Prints as `MasterKey(<redacted>)`.
#[derive(Clone)]
pub(crate) struct MasterKey {
    cipher: ChaCha20Poly1305,
    bytes: [u8; 32],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    pub(crate) fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(&Key::from(bytes)),
            bytes,
        }
    }

    /// Reads a key file: 64 hex digits, surrounding white space ignored.
    pub(crate) fn read(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read_to_string(path).map_err(|source| SealError::Read {
            path: path.to_owned(),
            source,
        })?;
        let malformed = || SealError::Malformed {
            path: path.to_owned(),
        };
        // The `hex` crate checks every character, so a file that is not ASCII
        // is refused as malformed rather than sliced mid-character.
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| malformed())?;
        Ok(Self::from_bytes(bytes))
    }

    /// Writes the key to a new file readable by its owner only; never
    /// overwrites an existing file.
    pub(crate) fn write_new(&self, path: &Path) -> Result<(), SealError> {
        let create_error = |source| SealError::Create {
            path: path.to_owned(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(create_error)?;
        file.write_all(format!("{}\n", hex::encode(self.bytes)).as_bytes())
            .map_err(create_error)?;
        file.sync_all().map_err(create_error)?;
        Ok(())
    }

    /// Seals `plaintext` for the place named by `binding` (e.g. "apps.client_secret/<key>").
    pub(crate) fn seal(&self, binding: &str, plaintext: &str) -> String {
        let mut nonce = [0u8; NONCE_LENGTH];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: binding.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        format!("{SEALED_PREFIX}{}", STANDARD_NO_PAD.encode(sealed))
    }

    /// Opens a value sealed for `binding`.
    pub(crate) fn open(&self, binding: &str, sealed: &str) -> Result<String, SealError> {
        let encoded = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(SealError::WrongKey)?;
        let bytes = STANDARD_NO_PAD
            .decode(encoded)
            .map_err(|_| SealError::WrongKey)?;
        if bytes.len() < NONCE_LENGTH {
            return Err(SealError::WrongKey);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LENGTH);
        let nonce: [u8; NONCE_LENGTH] = nonce.try_into().map_err(|_| SealError::WrongKey)?;
        let plaintext = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: binding.as_bytes(),
                },
            )
            .map_err(|_| SealError::WrongKey)?;
        String::from_utf8(plaintext).map_err(|_| SealError::WrongKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_binding() {
        let key = MasterKey::generate();
        let sealed = key.seal("apps.client_secret/app-1", "s3cret");
        assert!(sealed.starts_with(SEALED_PREFIX));
        assert!(!sealed.contains("s3cret"));
        assert_ne!(
            sealed,
            key.seal("apps.client_secret/app-1", "s3cret"),
            "a fresh nonce every time"
        );
        assert_eq!(
            key.open("apps.client_secret/app-1", &sealed).unwrap(),
            "s3cret"
        );
        assert!(
            key.open("apps.client_secret/app-2", &sealed).is_err(),
            "bound to its row"
        );
        assert!(
            MasterKey::generate()
                .open("apps.client_secret/app-1", &sealed)
                .is_err()
        );
        assert!(key.open("apps.client_secret/app-1", "plaintext").is_err());
    }

    #[test]
    fn key_files_are_created_owner_only_and_read_back() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("master.key");
        let key = MasterKey::generate();
        key.write_new(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let sealed = key.seal("b", "v");
        assert_eq!(
            MasterKey::read(&path).unwrap().open("b", &sealed).unwrap(),
            "v"
        );
        assert!(key.write_new(&path).is_err(), "never overwrites");
        for malformed in [
            "not hex".to_owned(),
            "ab".repeat(31),
            // 64 bytes that are not 64 characters: a byte-offset slice would
            // have cut 'é' in half and panicked.
            format!("{}é{}", "a".repeat(31), "b".repeat(31)),
        ] {
            std::fs::write(&path, &malformed).unwrap();
            assert!(
                matches!(MasterKey::read(&path), Err(SealError::Malformed { .. })),
                "{malformed:?}"
            );
        }
        assert_eq!(format!("{key:?}"), "MasterKey(<redacted>)");
    }
}
