//! Secret bytes from the OS RNG, fetched in bulk.
//!
//! Every BeginLogin needs 96 secret bytes (state, PKCE verifier, OIDC nonce).
//! One `getrandom` system call per login was the largest single cost left in
//! BeginLogin on hosts where system calls are dear (BENCHMARKS.md), so each
//! thread keeps a pool of OS randomness and refills all of it in one call.
//!
//! The bytes handed out are the OS RNG's own output, not a userspace
//! generator's, and each leaves the pool once: it is zeroed as it goes, and
//! the cursor never moves back. The process never forks, so no child can
//! inherit a pool and repeat its bytes.

use std::cell::RefCell;

use rand::{TryRngCore, rngs::OsRng};

use super::StateError;

/// Enough for 42 logins per system call; small enough that a thread's pool
/// is a page.
const POOL_BYTES: usize = 4096;

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool::EMPTY) };
}

/// Fills `out` with bytes from the OS RNG that no one else has been given.
pub fn fill(out: &mut [u8]) -> Result<(), StateError> {
    POOL.with_borrow_mut(|pool| pool.take(out, os_fill))
}

fn os_fill(buf: &mut [u8]) -> Result<(), StateError> {
    OsRng
        .try_fill_bytes(buf)
        .map_err(|e| StateError::Unavailable(anyhow::anyhow!("OS RNG failed: {e}")))
}

struct Pool {
    bytes: [u8; POOL_BYTES],
    /// Bytes before this have been handed out (and zeroed).
    next: usize,
}

impl Pool {
    const EMPTY: Pool = Pool {
        bytes: [0; POOL_BYTES],
        next: POOL_BYTES,
    };

    fn take<E>(
        &mut self,
        out: &mut [u8],
        refill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if out.len() > POOL_BYTES {
            return refill(out);
        }
        if POOL_BYTES - self.next < out.len() {
            // Until the refill succeeds the pool counts as empty, so a failed
            // refill can never leave stale or zeroed bytes to hand out.
            self.next = POOL_BYTES;
            refill(&mut self.bytes)?;
            self.next = 0;
        }
        let taken = &mut self.bytes[self.next..self.next + out.len()];
        out.copy_from_slice(taken);
        taken.fill(0);
        self.next += out.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A source numbering its bytes, so a test can see which ones came out.
    struct Numbered {
        next: u32,
        refills: usize,
    }

    impl Numbered {
        fn from(next: u32) -> Self {
            Numbered { next, refills: 0 }
        }

        fn fill(&mut self, buf: &mut [u8]) -> Result<(), ()> {
            self.refills += 1;
            for b in buf {
                *b = (self.next % 251) as u8;
                self.next += 1;
            }
            Ok(())
        }
    }

    #[test]
    fn hands_out_each_source_byte_once_in_order_and_zeroes_it() {
        let mut pool = Pool::EMPTY;
        let mut source = Numbered::from(0);
        let mut seen = Vec::new();
        // 96 does not divide 4096: the tail of each pool is dropped unused.
        for _ in 0..100 {
            let mut out = [0u8; 96];
            pool.take(&mut out, |b| source.fill(b)).unwrap();
            seen.push(out);
            assert!(pool.bytes[..pool.next].iter().all(|&b| b == 0));
        }
        assert_eq!(source.refills, 3, "42 takes of 96 bytes per 4096-byte pool");
        let per_pool = POOL_BYTES / 96;
        for (i, out) in seen.iter().enumerate() {
            let start = (i / per_pool) * POOL_BYTES + (i % per_pool) * 96;
            let expected: Vec<u8> = (start..start + 96).map(|n| (n % 251) as u8).collect();
            assert_eq!(out.as_slice(), expected.as_slice(), "take {i}");
        }
    }

    #[test]
    fn a_failed_refill_hands_out_nothing_and_the_next_call_retries() {
        let mut pool = Pool::EMPTY;
        let mut out = [7u8; 32];
        let failed: Result<(), &str> = pool.take(&mut out, |_| Err("no entropy"));
        assert_eq!(failed, Err("no entropy"));
        assert_eq!(out, [7u8; 32], "output untouched on failure");
        assert_eq!(pool.next, POOL_BYTES, "pool still counts as empty");

        let mut source = Numbered::from(1);
        pool.take(&mut out, |b| source.fill(b)).unwrap();
        assert_eq!(out[0], 1);
        assert_eq!(source.refills, 1);
    }

    #[test]
    fn requests_larger_than_the_pool_go_straight_to_the_source() {
        let mut pool = Pool::EMPTY;
        let mut source = Numbered::from(0);
        let mut big = vec![0u8; POOL_BYTES + 1];
        pool.take(&mut big, |b| source.fill(b)).unwrap();
        assert_eq!(source.refills, 1);
        assert_eq!(big[POOL_BYTES], (POOL_BYTES % 251) as u8);
        assert_eq!(pool.next, POOL_BYTES, "the pool was not filled");
    }

    #[test]
    fn os_bytes_never_repeat_across_threads() {
        let draws: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..2_000)
                            .map(|_| {
                                let mut out = [0u8; 32];
                                fill(&mut out).unwrap();
                                out
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let distinct: HashSet<_> = draws.iter().collect();
        assert_eq!(distinct.len(), draws.len());
        assert!(!draws.contains(&[0u8; 32]));
    }
}
