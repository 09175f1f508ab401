//! Clients per address: what `--max-clients-per-ip` bounds, and which
//! address a client has when a proxy stands in front of the instance.
//!
//! Without a bound per address, one machine could hold every place of
//! `--max-clients`. Behind a proxy (nginx, a load balancer) every client
//! arrives from the proxy's address, and the proxy says who it forwards in
//! `X-Forwarded-For`; that header is believed only from a trusted proxy
//! (`--trusted-proxies`, loopback by default), since any client can write
//! it. The list is read from the right: the last address a trusted proxy
//! added, skipping proxies of our own, is the client's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Proxies whose `X-Forwarded-For` is believed: addresses or networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses `127.0.0.1`, `10.0.0.0/8`, `::1`, comma-separated items.
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut networks = Vec::new();
        for item in items
            .iter()
            .map(|item| item.trim())
            .filter(|i| !i.is_empty())
        {
            let (address, prefix) = match item.split_once('/') {
                Some((address, prefix)) => (address, Some(prefix)),
                None => (item, None),
            };
            let address: IpAddr = address
                .parse()
                .map_err(|_| format!("--trusted-proxies: {item:?} is not an address"))?;
            let most = if address.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => most,
                Some(prefix) => prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|&p| p <= most)
                    .ok_or_else(|| format!("--trusted-proxies: {item:?} has a bad prefix"))?,
            };
            networks.push((address, prefix));
        }
        Ok(TrustedProxies(networks))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .iter()
            .any(|&(network, prefix)| in_network(ip, network, prefix))
    }

    /// The client's address: `peer`, or, when `peer` is a trusted proxy,
    /// the last address of `forwarded_for` that is not one.
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let Some(list) = forwarded_for else {
            return peer;
        };
        list.rsplit(',')
            .filter_map(|item| item.trim().parse::<IpAddr>().ok())
            .find(|&ip| !self.contains(ip))
            .unwrap_or(peer)
    }
}

fn in_network(ip: IpAddr, network: IpAddr, prefix: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(network)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(network) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(network)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(network) & mask
        }
        _ => false,
    }
}

/// Clients connected per address, at most `max` each (0: no bound).
#[derive(Debug, Default)]
pub struct PerAddress {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// A place taken for one client of an address; given back on drop.
#[derive(Debug)]
pub struct AddressSlot {
    owner: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerAddress {
            max,
            counts: Mutex::default(),
        })
    }

    /// A place for one more client of `ip`, if it has fewer than `max`.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        if self.max == 0 {
            return Some(AddressSlot {
                owner: Arc::clone(self),
                ip,
            });
        }
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(ip).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            owner: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if self.owner.max == 0 {
            return;
        }
        let mut counts = self
            .owner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
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
    fn the_forwarded_address_counts_only_behind_a_trusted_proxy() {
        let trusted =
            TrustedProxies::parse(&["127.0.0.1".into(), "10.0.0.0/8".into(), "::1".into()])
                .unwrap();
        let loopback = ip("127.0.0.1");
        assert_eq!(
            trusted.client_address(loopback, Some("203.0.113.7")),
            ip("203.0.113.7")
        );
        // A client's own claim, then the address our proxies saw.
        assert_eq!(
            trusted.client_address(loopback, Some("1.2.3.4, 203.0.113.7, 10.1.2.3")),
            ip("203.0.113.7")
        );
        assert_eq!(trusted.client_address(loopback, None), loopback);
        let outsider = ip("198.51.100.9");
        assert_eq!(
            trusted.client_address(outsider, Some("203.0.113.7")),
            outsider
        );
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["nginx".into()]).is_err());
    }

    #[test]
    fn an_address_holds_at_most_max_places_and_gets_them_back() {
        let per = PerAddress::new(2);
        let a = ip("203.0.113.7");
        let first = per.take(a).unwrap();
        let _second = per.take(a).unwrap();
        assert!(per.take(a).is_none());
        assert!(per.take(ip("203.0.113.8")).is_some());
        drop(first);
        assert!(per.take(a).is_some());
        let unbounded = PerAddress::new(0);
        let held: Vec<_> = (0..100).map(|_| unbounded.take(a).unwrap()).collect();
        assert_eq!(held.len(), 100);
    }
}
