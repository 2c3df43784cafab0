//! Rate limits as pure state: token buckets by key, on time passed in. DNS response rate
//! limiting (per client prefix and name, with slip) and the per-agent message limit both use
//! [`Buckets`]; the edges own one and tell it the time.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

/// Keyed token buckets: each key may spend `rate` per second with bursts of `burst`.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
    /// Refusals since the last slipped answer (DNS).
    refused: u32,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// `rate` per second, bursts of `burst`, tracking at most `max_keys` keys (the idle ones
    /// are forgotten first; a key that is forgotten starts again with a full bucket).
    pub fn new(rate: f64, burst: f64, max_keys: usize) -> Self {
        Self {
            rate: rate.max(0.0),
            burst: burst.max(1.0),
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    fn bucket(&mut self, key: &K, now_ms: u64) -> &mut Bucket {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.forget_idle(now_ms);
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at_ms: now_ms,
            refused: 0,
        });
        let dt = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + dt * rate).min(burst);
        b.at_ms = b.at_ms.max(now_ms);
        b
    }

    /// Spends one token of `key` at `now_ms`; false when it has none.
    pub fn take(&mut self, key: &K, now_ms: u64) -> bool {
        let b = self.bucket(key, now_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            b.refused = 0;
            true
        } else {
            false
        }
    }

    /// Keys whose buckets are full again carry no state worth keeping; when that is not
    /// enough, half of the table goes, oldest first.
    fn forget_idle(&mut self, now_ms: u64) {
        let full_after_ms = (self.burst / self.rate.max(1e-9) * 1000.0) as u64;
        self.buckets
            .retain(|_, b| now_ms.saturating_sub(b.at_ms) < full_after_ms);
        if self.buckets.len() >= self.max_keys {
            let mut ages: Vec<u64> = self.buckets.values().map(|b| b.at_ms).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.buckets.retain(|_, b| b.at_ms > cut);
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// What DNS response rate limiting does with one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Answer,
    /// Over the limit: send an empty truncated answer instead, so a real client retries over
    /// TCP (which cannot be spoofed) while a spoofed victim gets nothing larger than it sent.
    Slip,
    /// Over the limit: send nothing.
    Drop,
}

/// Response rate limiting as NSD, BIND and Knot do it: answers to one client prefix (/24 for
/// IPv4, /56 for IPv6) for one name and type are limited to `rate` per second; errors
/// (NXDOMAIN, REFUSED, ...) count per prefix together, whatever the name. Over the limit,
/// every `slip`-th answer is slipped (0: never) and the rest dropped.
#[derive(Debug)]
pub struct Rrl {
    buckets: Buckets<(IpAddr, u64)>,
    slip: u32,
}

/// Settings of [`Rrl`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RrlConfig {
    /// Answers per second per client prefix and name (0: rate limiting off).
    pub rate: u32,
    /// Every this many refused answers, one slips (0: never; 1: always).
    pub slip: u32,
    /// IPv4 prefix length clients are grouped by.
    pub ipv4_prefix: u8,
    /// IPv6 prefix length clients are grouped by.
    pub ipv6_prefix: u8,
    /// Most keys tracked.
    pub max_keys: usize,
}

impl Default for RrlConfig {
    /// NSD's defaults: 200 per second, slip 2, /24 and /56 (BIND's IPv6 default).
    fn default() -> Self {
        Self {
            rate: 200,
            slip: 2,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            max_keys: 1 << 20,
        }
    }
}

/// `ip` with only its first `v4`/`v6` bits kept.
pub fn prefix(ip: IpAddr, v4: u8, v6: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = if v4 == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(v4.min(32)))
            };
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = if v6 == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(v6.min(128)))
            };
            IpAddr::V6((bits & mask).into())
        }
    }
}

impl Rrl {
    /// Off when `config.rate` is 0 (`None`).
    pub fn new(config: RrlConfig) -> Option<(Rrl, RrlConfig)> {
        if config.rate == 0 {
            return None;
        }
        let r = f64::from(config.rate);
        Some((
            Rrl {
                buckets: Buckets::new(r, r, config.max_keys),
                slip: config.slip,
            },
            config,
        ))
    }

    /// The verdict on one answer to `client_prefix` (see [`prefix`]) for the name and type
    /// hashed in `name_key` (0 for an error answer), at `now_ms`.
    pub fn check(&mut self, client_prefix: IpAddr, name_key: u64, now_ms: u64) -> Verdict {
        let key = (client_prefix, name_key);
        if self.buckets.take(&key, now_ms) {
            return Verdict::Answer;
        }
        let b = self.buckets.bucket(&key, now_ms);
        b.refused = b.refused.saturating_add(1);
        match self.slip {
            0 => Verdict::Drop,
            s if b.refused.is_multiple_of(s) => Verdict::Slip,
            _ => Verdict::Drop,
        }
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let mut b = Buckets::new(10.0, 5.0, 100);
        for _ in 0..5 {
            assert!(b.take(&"a", 0));
        }
        assert!(!b.take(&"a", 0));
        assert!(b.take(&"b", 0), "keys are separate");
        assert!(!b.take(&"a", 50), "half a token after 50 ms");
        assert!(b.take(&"a", 100));
        // A long pause refills to the burst, not beyond.
        let n = (0..20).filter(|_| b.take(&"a", 60_000)).count();
        assert_eq!(n, 5);
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut b = Buckets::new(1.0, 1.0, 1000);
        for i in 0..100_000u32 {
            b.take(&i, u64::from(i));
        }
        assert!(b.len() <= 1000, "{}", b.len());
    }

    #[test]
    fn clients_are_grouped_by_prefix() {
        assert_eq!(prefix(ip("10.1.2.3"), 24, 56), ip("10.1.2.0"));
        assert_eq!(
            prefix(ip("2001:db8:1:2ff::1"), 24, 56),
            ip("2001:db8:1:200::")
        );
        assert_eq!(prefix(ip("10.1.2.3"), 0, 56), ip("0.0.0.0"));
        assert_eq!(prefix(ip("10.1.2.3"), 32, 56), ip("10.1.2.3"));
    }

    #[test]
    fn over_the_limit_every_second_answer_slips_and_the_rest_drop() {
        let (mut r, _) = Rrl::new(RrlConfig {
            rate: 3,
            ..RrlConfig::default()
        })
        .unwrap();
        let p = prefix(ip("192.0.2.7"), 24, 56);
        let got: Vec<Verdict> = (0..7).map(|_| r.check(p, 42, 0)).collect();
        use Verdict::*;
        assert_eq!(got, vec![Answer, Answer, Answer, Drop, Slip, Drop, Slip]);
        // Another name, or another prefix, has its own budget.
        assert_eq!(r.check(p, 43, 0), Answer);
        assert_eq!(r.check(prefix(ip("192.0.3.7"), 24, 56), 42, 0), Answer);
        // A second later the name answers again.
        assert_eq!(r.check(p, 42, 1000), Answer);
        assert!(
            Rrl::new(RrlConfig {
                rate: 0,
                ..RrlConfig::default()
            })
            .is_none()
        );
        let (mut never, _) = Rrl::new(RrlConfig {
            rate: 1,
            slip: 0,
            ..RrlConfig::default()
        })
        .unwrap();
        never.check(p, 1, 0);
        assert!((0..10).all(|_| never.check(p, 1, 0) == Drop));
    }
}
