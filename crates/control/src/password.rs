//! Token passwords: generated from the OS CSPRNG, shown once, stored only as Argon2id PHC
//! strings. Hashing and verifying are deliberately slow and take ~19 MiB each; callers run
//! them on a few threads that each keep one working memory, and cache successful
//! verifications.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, SaltString};
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

/// Argon2's working memory, reused from one call to the next by the thread that owns it:
/// anonymous pages mapped for it alone, so that [`Memory::release`] gives them back to the
/// system at once. (Taken from malloc, a freed 19 MiB buffer stays in the process: glibc
/// raises its mmap threshold after the first such free, serves the next buffer from a
/// thread's arena, and does not trim it.)
#[derive(Default)]
pub struct Memory {
    map: Option<memmap2::MmapMut>,
}

impl Memory {
    pub fn new() -> Memory {
        Memory::default()
    }

    /// Unmaps the pages, if any.
    pub fn release(&mut self) {
        self.map = None;
    }

    /// `n` blocks, mapped anew if the current mapping is smaller.
    fn blocks(&mut self, n: usize) -> std::io::Result<&mut [argon2::Block]> {
        let bytes = n.saturating_mul(std::mem::size_of::<argon2::Block>());
        let map = match &mut self.map {
            Some(m) if m.len() >= bytes => m,
            slot => slot.insert(memmap2::MmapMut::map_anon(bytes.max(1))?),
        };
        // SAFETY: the mapping is page-aligned (a Block needs 64 bytes), at least `bytes`
        // long, and holds only plain integers: its pages start zeroed and a Block is an array
        // of u64, valid for any bits. The slice borrows `self`, so the mapping outlives it.
        Ok(unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().cast::<argon2::Block>(), n) })
    }
}

/// The most working memory a stored hash may ask for (64 MiB; ours ask for 19 MiB). A hash
/// from elsewhere (a parent's configuration, an offline bundle) asking for more is refused
/// rather than computed.
const MAX_BLOCKS: u32 = 64 * 1024;
/// The most passes a stored hash may ask for (ours: 2).
const MAX_PASSES: u32 = 16;

/// Hashes `password` with Argon2id's default parameters and a new random salt, into a PHC
/// string, using `memory` as working memory.
pub fn hash(password: &str, memory: &mut Memory) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    let params = argon2::Params::default();
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt.as_salt().decode_b64(&mut salt_bytes)?;
    let mut out = [0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
    run(&Argon2::default(), password, salt_raw, &mut out, memory)?;
    Ok(PasswordHash {
        algorithm: argon2::Algorithm::Argon2id.ident(),
        version: Some(argon2::Version::V0x13.into()),
        params: argon2::password_hash::ParamsString::try_from(&params)?,
        salt: Some(salt.as_salt()),
        hash: Some(argon2::password_hash::Output::new(&out)?),
    }
    .to_string())
}

/// Whether `password` matches the PHC string `phc`, using `memory` as working memory. A hash
/// that is malformed or asks for more than [`MAX_BLOCKS`] or [`MAX_PASSES`] matches nothing.
pub fn verify(password: &str, phc: &str, memory: &mut Memory) -> bool {
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    let (Ok(params), Ok(algorithm)) = (
        argon2::Params::try_from(&h),
        argon2::Algorithm::try_from(h.algorithm),
    ) else {
        return false;
    };
    let Ok(version) = h
        .version
        .map(argon2::Version::try_from)
        .transpose()
        .map(Option::unwrap_or_default)
    else {
        return false;
    };
    if params.m_cost() > MAX_BLOCKS || params.t_cost() > MAX_PASSES {
        return false;
    }
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    if run(&argon, password, salt, &mut out, memory).is_err() {
        return false;
    }
    // `Output`'s equality runs in constant time.
    argon2::password_hash::Output::new(&out).is_ok_and(|o| o == expected)
}

fn run(
    argon: &Argon2<'_>,
    password: &str,
    salt: &[u8],
    out: &mut [u8],
    memory: &mut Memory,
) -> argon2::Result<()> {
    let blocks = memory
        .blocks(argon.params().block_count())
        .map_err(|_| argon2::Error::MemoryTooLittle)?;
    argon.hash_password_into_with_memory(password.as_bytes(), salt, out, blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_distinct_and_verify() {
        let mut m = Memory::new();
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 40);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        let h = hash(&a, &mut m).unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify(&a, &h, &mut m));
        assert!(!verify(&b, &h, &mut m));
        assert!(!verify(&a, "not a phc string", &mut m));
    }

    /// Hashes stored by earlier releases (the argon2 crate's own `PasswordHasher`) still verify,
    /// and ours verify with the crate's own verifier.
    #[test]
    fn hashes_agree_with_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let mut m = Memory::new();
        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"hunter2", &salt)
            .unwrap()
            .to_string();
        assert!(verify("hunter2", &theirs, &mut m));
        assert!(!verify("hunter3", &theirs, &mut m));
        let ours = hash("hunter2", &mut m).unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"hunter2", &parsed)
                .is_ok()
        );
    }

    /// A stored hash asking for more memory or passes than ours is refused, not computed.
    #[test]
    fn hashes_asking_for_too_much_are_refused() {
        use argon2::password_hash::PasswordHasher;
        let mut m = Memory::new();
        let salt = SaltString::generate(&mut OsRng);
        for (blocks, passes) in [(MAX_BLOCKS * 2, 1), (8, MAX_PASSES + 1)] {
            // Hash with a small memory so the test stays cheap: only the text's parameters
            // matter to the check.
            let small = Argon2::new(
                argon2::Algorithm::Argon2id,
                argon2::Version::V0x13,
                argon2::Params::new(8, 1, 1, None).unwrap(),
            );
            let phc = small
                .hash_password(b"pw", &salt)
                .unwrap()
                .to_string()
                .replace("m=8,t=1", &format!("m={blocks},t={passes}"));
            assert!(phc.contains(&format!("m={blocks},t={passes}")), "{phc}");
            assert!(!verify("pw", &phc, &mut m), "{phc}");
        }
        assert!(m.map.is_none(), "nothing was computed");
    }
}
