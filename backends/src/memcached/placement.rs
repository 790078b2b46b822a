//! Where a key goes: rendezvous (highest random weight) hashing over FNV-1a, and the
//! first servers of a key's order that are up. Pure functions, the same in every process
//! and every build.

use tessera_protocol::key::placed_as;

/// 64-bit FNV-1a: fixed by its definition, so placement never changes between builds.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_parts(&[bytes])
}

/// [`fnv1a64`] of the concatenation of `parts`.
fn fnv1a64_parts(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.iter())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// SplitMix64's finalizer: spreads the combined hash over all 64 bits.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The hash a key is placed by: a lease's is its envelope's ([`placed_as`]).
pub(super) fn key_hash(key: &[u8]) -> u64 {
    fnv1a64_parts(&placed_as(key))
}

/// The server of `key` among `servers` (as written in the configuration): rendezvous
/// (highest random weight) hashing, each server scored by `mix(fnv(key) ^ fnv(server))`.
/// Adding or removing a server moves only the keys it wins or held; the order of the list
/// does not matter. A lease is placed as its envelope ([`placed_as`]).
pub fn place(key: &[u8], servers: &[String]) -> usize {
    let hashes: Vec<u64> = servers.iter().map(|s| fnv1a64(s.as_bytes())).collect();
    first_two(key_hash(key), &hashes, |_| true)[0].unwrap_or(0)
}

/// The first two servers of the order of the key hashed `key`, among those `up` keeps:
/// the key's home, then the next. A tie goes to the later server, as `max_by_key` gives
/// it (placement as earlier releases computed it).
pub(super) fn first_two(
    key: u64,
    servers: &[u64],
    up: impl Fn(usize) -> bool,
) -> [Option<usize>; 2] {
    let mut best: Option<(u64, usize)> = None;
    let mut next: Option<(u64, usize)> = None;
    for (i, &server) in servers.iter().enumerate() {
        if !up(i) {
            continue;
        }
        let score = mix(key ^ server);
        if best.is_none_or(|(b, _)| score >= b) {
            next = best;
            best = Some((score, i));
        } else if next.is_none_or(|(n, _)| score >= n) {
            next = Some((score, i));
        }
    }
    [best.map(|(_, i)| i), next.map(|(_, i)| i)]
}

/// The first server of the order of the key hashed `key` that `up` keeps.
pub(super) fn first(key: u64, servers: &[u64], up: impl Fn(usize) -> bool) -> Option<usize> {
    let mut best: Option<(u64, usize)> = None;
    for (i, &server) in servers.iter().enumerate() {
        if !up(i) {
            continue;
        }
        let score = mix(key ^ server);
        if best.is_none_or(|(b, _)| score >= b) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Servers ranked before `server` in the order of the key hashed `key`.
pub(super) fn ranked_before(
    key: u64,
    servers: &[u64],
    server: usize,
) -> impl Iterator<Item = usize> {
    let mark = mix(key ^ servers[server]);
    servers
        .iter()
        .enumerate()
        .filter(move |&(i, &s)| {
            let score = mix(key ^ s);
            // Ties go to the later server (see `first_two`).
            i != server && (score > mark || (score == mark && i > server))
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: u16) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:11211")).collect()
    }

    fn hashes(servers: &[String]) -> Vec<u64> {
        servers.iter().map(|s| fnv1a64(s.as_bytes())).collect()
    }

    #[test]
    fn placement_is_fixed_by_definition() {
        // FNV-1a reference values (draft-eastlake-fnv).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Pinned: a change here is a cold start for every deployment.
        let three = servers(3);
        let placed: Vec<usize> = ["a", "b", "c", "tessera:f:x", "foobar"]
            .iter()
            .map(|k| place(k.as_bytes(), &three))
            .collect();
        // Computed independently (a Python transcription of `place`).
        assert_eq!(placed, [1, 2, 0, 1, 2]);
        assert_eq!(place(b"k", &servers(1)), 0);
    }

    #[test]
    fn growing_from_four_to_five_servers_moves_about_a_fifth_of_keys() {
        let (four, five) = (servers(4), servers(5));
        let mut counts = [0usize; 5];
        let mut moved = 0;
        for n in 0..10_000 {
            let key = format!("tessera:f:route:{n}");
            let (before, after) = (place(key.as_bytes(), &four), place(key.as_bytes(), &five));
            counts[after] += 1;
            if before != after {
                assert_eq!(after, 4, "a key only ever moves to the new server");
                moved += 1;
            }
        }
        // The new server wins about 1/5 (2,000); `% n` would move about 4/5.
        assert!(
            (1_700..=2_300).contains(&moved),
            "{moved} of 10,000 keys moved"
        );
        for c in counts {
            assert!((1_700..=2_300).contains(&c), "unbalanced: {counts:?}");
        }
        // The order of the list does not matter.
        let mut shuffled = five.clone();
        shuffled.reverse();
        for n in 0..1_000 {
            let key = format!("k{n}");
            assert_eq!(
                five[place(key.as_bytes(), &five)],
                shuffled[place(key.as_bytes(), &shuffled)]
            );
        }
    }

    #[test]
    fn a_lease_is_placed_with_its_envelope_and_nothing_else_moves() {
        let five = servers(5);
        let mut spread = [0usize; 5];
        for n in 0..1_000 {
            let envelope = format!("ns-1:f:recs:7:{n:032x}");
            let lease = format!("ns-1:p:recs:7:{n:032x}");
            let at = place(envelope.as_bytes(), &five);
            assert_eq!(place(lease.as_bytes(), &five), at, "{lease}");
            spread[at] += 1;
        }
        assert!(spread.iter().all(|&c| c > 100), "unbalanced: {spread:?}");
        // Only the kind right after the namespace is read: other keys place as themselves.
        assert_eq!(placed_as(b"ns:t:a:p:b"), [&b"ns:t:a:p:b"[..], b"", b""]);
        assert_eq!(placed_as(b"ns:p:x"), [&b"ns"[..], b":f:", b"x"]);
    }

    #[test]
    fn a_server_out_sends_only_its_own_keys_to_the_next_one() {
        let three = hashes(&servers(3));
        let mut moved = [0usize; 3];
        for n in 0..3_000 {
            let key = key_hash(format!("tessera:f:r:{n}").as_bytes());
            let [home, next] = first_two(key, &three, |_| true);
            let (home, next) = (home.unwrap(), next.unwrap());
            assert_ne!(home, next);
            assert_eq!(first(key, &three, |_| true), Some(home));
            // The home out: its keys go to their next server, which is the only one
            // ranked before it.
            assert_eq!(first(key, &three, |s| s != home), Some(next));
            assert_eq!(
                first_two(key, &three, |s| s != home),
                [Some(next), Some(3 - home - next)]
            );
            assert_eq!(ranked_before(key, &three, next).collect::<Vec<_>>(), [home]);
            assert_eq!(ranked_before(key, &three, home).count(), 0);
            // Another server out moves nothing.
            let other = 3 - home - next;
            assert_eq!(first(key, &three, |s| s != other), Some(home));
            moved[home] += 1;
        }
        assert!(moved.iter().all(|&m| m > 800), "{moved:?}");
        assert_eq!(first(1, &three, |_| false), None);
        assert_eq!(first_two(1, &three[..1], |_| true), [Some(0), None]);
    }
}
