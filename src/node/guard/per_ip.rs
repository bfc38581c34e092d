//! The per-address table: connections open and recent connection attempts per client
//! address bucket (an IPv4 address, or an IPv6 prefix), with the limits that refuse a new
//! connection. Bounded in memory whatever the number of addresses.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Why a client address may not connect now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limited {
    /// It has `server.max_connections_per_ip` connections open.
    Connections,
    /// It tried to connect faster than `server.connects_per_ip_per_second`.
    Rate,
}

/// Open connections and recent connection attempts per client address bucket (see
/// [`bucket`]).
///
/// Bounded: one open-count entry per bucket with a connection open (so at most the open
/// connections), and at most `2 × MAX_TRACKED` attempt entries, about 50 bytes each. Every
/// operation under the lock is O(1) amortised: nothing is ever scanned.
#[derive(Debug)]
pub(crate) struct PerIp {
    state: Mutex<Table>,
    ipv6_prefix_len: u8,
    max_tracked: usize,
}

/// Attempt entries kept per generation; the table holds at most twice as many.
const MAX_TRACKED: usize = 50_000;

#[derive(Debug)]
struct Table {
    /// Connections open per bucket; an entry leaves when its count returns to 0.
    open: HashMap<IpAddr, u32>,
    /// Attempt token buckets touched since `rotated` ...
    current: HashMap<IpAddr, Tokens>,
    /// ... and those last touched in the generation before. A bucket touched again moves
    /// back to `current`; the older generation is dropped whole at each rotation.
    previous: HashMap<IpAddr, Tokens>,
    rotated: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Tokens {
    tokens: f64,
    last: Instant,
}

/// Limits for [`PerIp::admit`]; 0 turns one off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IpLimits {
    /// Connections open at once per address.
    pub(crate) max_open: usize,
    /// Connection attempts per second per address, sustained.
    pub(crate) rate: f64,
    /// Connection attempts per address in a burst.
    pub(crate) burst: u32,
}

impl IpLimits {
    /// How long an idle token bucket takes to refill: one forgotten after at least this long
    /// is the same as a new one, so this is how long a generation of the table lasts.
    fn refill_time(&self) -> Duration {
        let secs = f64::from(self.burst) / self.rate;
        Duration::try_from_secs_f64(secs)
            .unwrap_or(Duration::MAX)
            .clamp(Duration::from_secs(1), Duration::from_secs(24 * 3600))
    }
}

/// The key an address is counted under: an IPv4 address (IPv4-mapped IPv6 included) alone,
/// an IPv6 address by its first `ipv6_prefix_len` bits, since one subscriber usually holds a
/// whole /64 (or more) and can use any address in it.
pub(crate) fn bucket(ip: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let host_bits = 128 - u32::from(ipv6_prefix_len.min(128));
            let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

impl Default for PerIp {
    fn default() -> Self {
        Self::new(64)
    }
}

impl PerIp {
    /// An empty table that counts IPv6 addresses by their first `ipv6_prefix_len` bits.
    pub(crate) fn new(ipv6_prefix_len: u8) -> Self {
        Self::with_max_tracked(ipv6_prefix_len, MAX_TRACKED)
    }

    fn with_max_tracked(ipv6_prefix_len: u8, max_tracked: usize) -> Self {
        Self {
            state: Mutex::new(Table {
                open: HashMap::new(),
                current: HashMap::new(),
                previous: HashMap::new(),
                rotated: Instant::now(),
            }),
            ipv6_prefix_len,
            max_tracked: max_tracked.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts an attempt from `ip`; on success the returned guard holds one of its
    /// connection slots until dropped.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, limits: IpLimits) -> Result<IpSlot, Limited> {
        let key = bucket(ip, self.ipv6_prefix_len);
        let mut table = self.lock();
        if limits.rate > 0.0 {
            table.take_token(key, limits, self.max_tracked)?;
        }
        let open = table.open.get(&key).copied().unwrap_or(0);
        if limits.max_open > 0 && open as usize >= limits.max_open {
            return Err(Limited::Connections);
        }
        *table.open.entry(key).or_insert(0) += 1;
        Ok(IpSlot {
            table: self.clone(),
            ip: key,
        })
    }

    /// Connections open from `ip`'s bucket now.
    #[cfg(test)]
    pub(crate) fn open(&self, ip: IpAddr) -> usize {
        let key = bucket(ip, self.ipv6_prefix_len);
        self.lock().open.get(&key).map_or(0, |n| *n as usize)
    }

    /// Attempt entries held now, both generations.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        let table = self.lock();
        table.current.len() + table.previous.len()
    }
}

impl Table {
    /// Takes one attempt token from `key`'s bucket, or refuses with [`Limited::Rate`].
    fn take_token(&mut self, key: IpAddr, limits: IpLimits, max: usize) -> Result<(), Limited> {
        let now = Instant::now();
        let burst = f64::from(limits.burst);
        if now.saturating_duration_since(self.rotated) >= limits.refill_time() {
            self.rotate(now);
        }
        if !self.current.contains_key(&key) {
            let carried = self.previous.remove(&key);
            // Full: start a generation early. Buckets then may be forgotten before they
            // refill (an address flood costs precision, never memory).
            if self.current.len() >= max {
                self.rotate(now);
            }
            let fresh = Tokens {
                tokens: burst,
                last: now,
            };
            self.current.insert(key, carried.unwrap_or(fresh));
        }
        // Inserted just above when absent.
        let entry = self.current.get_mut(&key).expect("bucket present");
        let elapsed = now.saturating_duration_since(entry.last).as_secs_f64();
        entry.tokens = (entry.tokens + elapsed * limits.rate).min(burst);
        entry.last = now;
        if entry.tokens < 1.0 {
            return Err(Limited::Rate);
        }
        entry.tokens -= 1.0;
        Ok(())
    }

    /// `current` becomes `previous`; the old `previous` is dropped. Its entries are plain
    /// values, so dropping frees the memory without visiting them.
    fn rotate(&mut self, now: Instant) {
        self.previous = std::mem::take(&mut self.current);
        self.rotated = now;
    }
}

/// One open connection of an address; released when dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        if let Some(n) = table.open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_count_by_prefix_and_mapped_ipv4_as_ipv4() {
        let same_64 = (ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::9"));
        assert_eq!(bucket(same_64.0, 64), bucket(same_64.1, 64));
        assert_eq!(bucket(same_64.0, 64), ip("2001:db8:1:2::"));
        assert_ne!(bucket(same_64.0, 128), bucket(same_64.1, 128));
        assert_ne!(
            bucket(ip("2001:db8:1:2::1"), 64),
            bucket(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(bucket(ip("2001:db8:1:2::1"), 48), ip("2001:db8:1::"));
        assert_eq!(bucket(ip("::ffff:1.2.3.4"), 64), ip("1.2.3.4"));
        assert_ne!(bucket(ip("1.2.3.4"), 32), bucket(ip("1.2.3.5"), 32));
    }

    #[test]
    fn one_ipv6_64_shares_its_limit_unless_128_is_configured() {
        let limits = IpLimits {
            max_open: 1,
            rate: 0.0,
            burst: 1,
        };
        let (a, b) = (ip("2001:db8:0:1::a"), ip("2001:db8:0:1:ffff::b"));
        let table = Arc::new(PerIp::new(64));
        let _held = table.admit(a, limits).unwrap();
        assert_eq!(table.admit(b, limits).unwrap_err(), Limited::Connections);
        assert!(table.admit(ip("2001:db8:0:2::a"), limits).is_ok());
        let table = Arc::new(PerIp::new(128));
        let _held = table.admit(a, limits).unwrap();
        assert!(table.admit(b, limits).is_ok());
        // An IPv4-mapped address is the IPv4 address.
        let table = Arc::new(PerIp::default());
        let _held = table.admit(ip("1.2.3.4"), limits).unwrap();
        let mapped = ip("::ffff:1.2.3.4");
        assert_eq!(
            table.admit(mapped, limits).unwrap_err(),
            Limited::Connections
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded_and_forgets_idle_addresses() {
        let table = Arc::new(PerIp::with_max_tracked(64, 100));
        // A full bucket refills in 2 s: a generation lasts that long.
        let limits = IpLimits {
            max_open: 0,
            rate: 1.0,
            burst: 2,
        };
        // A flood of distinct addresses never holds more than two generations.
        for n in 0..10_000u32 {
            drop(table.admit(IpAddr::from(n.to_be_bytes()), limits).unwrap());
            assert!(table.tracked() <= 200, "{} entries", table.tracked());
        }
        assert!(
            table.lock().open.is_empty(),
            "released slots leave no entry"
        );
        // An address that used its burst is remembered while it refills ...
        let a = ip("203.0.113.1");
        let _first = table.admit(a, limits).unwrap();
        let _second = table.admit(a, limits).unwrap();
        assert_eq!(table.admit(a, limits).unwrap_err(), Limited::Rate);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(table.admit(ip("203.0.113.2"), limits).is_ok());
        assert!(table.admit(a, limits).is_ok(), "1.5 tokens back");
        assert_eq!(table.admit(a, limits).unwrap_err(), Limited::Rate);
        // ... and is forgotten two generations after it went idle.
        for other in ["203.0.113.3", "203.0.113.4"] {
            tokio::time::advance(Duration::from_secs(2)).await;
            assert!(table.admit(ip(other), limits).is_ok());
        }
        assert_eq!(
            table.tracked(),
            2,
            "only the last two generations' addresses"
        );
        assert_eq!(
            table.open(a),
            2,
            "open connections are kept whatever their age"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_ip_limits_cap_open_connections_and_attempt_rate() {
        let table = Arc::new(PerIp::default());
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        let limits = IpLimits {
            max_open: 2,
            rate: 1.0,
            burst: 3,
        };
        let a = table.admit(ip, limits).unwrap();
        let _b = table.admit(ip, limits).unwrap();
        assert_eq!(table.admit(ip, limits).unwrap_err(), Limited::Connections);
        drop(a);
        assert_eq!(table.open(ip), 1);
        // Three attempts used the burst.
        assert_eq!(table.admit(ip, limits).unwrap_err(), Limited::Rate);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(table.admit(ip, limits).is_ok());
        // Other addresses are not affected.
        assert!(table.admit("5.6.7.8".parse().unwrap(), limits).is_ok());
    }
}
