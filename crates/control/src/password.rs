//! Token passwords: generated from the OS CSPRNG, shown once, stored only as Argon2id PHC
//! strings. Hashing and verifying are deliberately slow; callers run them on the blocking pool
//! and cache successful verifications.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand_core::{OsRng, RngCore};

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A new random password: 40 alphanumeric characters (about 238 bits).
pub fn generate() -> String {
    let mut out = String::with_capacity(40);
    let mut buf = [0u8; 64];
    while out.len() < 40 {
        OsRng.fill_bytes(&mut buf);
        // rejection sampling keeps the distribution uniform
        for b in buf {
            if (b as usize) < 248 && out.len() < 40 {
                out.push(ALPHABET[b as usize % 62] as char);
            }
        }
    }
    out
}

/// 32 random bytes (signing keys).
pub fn random_key() -> Vec<u8> {
    let mut k = vec![0u8; 32];
    OsRng.fill_bytes(&mut k);
    k
}

pub fn hash(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

pub fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_distinct_and_verify() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 40);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        let h = hash(&a).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(&a, &h));
        assert!(!verify(&b, &h));
        assert!(!verify(&a, "not a phc string"));
    }
}
