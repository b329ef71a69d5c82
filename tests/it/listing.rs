//! Listings agree with what an instance answered, and follow other instances within a second:
//! two `kesh server` processes on one SoftHSM token (docs/scale-out.md).

use std::time::{Duration, Instant};

use kesh::keystore::pkcs11::ephemeral::EphemeralToken;

use crate::harness::{self, server, ServerProcess};

/// Two servers on `token`, with only module, token and PIN configured: the profile is the
/// one detected from the module.
fn two_servers(token: &EphemeralToken) -> (ServerProcess, ServerProcess) {
    two_servers_with(token, "")
}

/// [`two_servers`] with more `pkcs11:` settings (indented lines).
fn two_servers_with(token: &EphemeralToken, more: &str) -> (ServerProcess, ServerProcess) {
    let keystore = format!(
        "  pkcs11:\n    module: {}\n    token: {}\n    pin: ${{KESH_PIN}}\n{more}",
        token.module.display(),
        token.label
    );
    let pin = token.pin().expose().to_owned();
    let start = || {
        server()
            .keystore_yaml(&keystore)
            .env("KESH_PIN", &pin)
            .spawn()
    };
    (start(), start())
}

/// Polls `c`'s listing until `want(listed)` holds; returns how long that took, `None` after
/// `limit`.
async fn listed_within(
    c: &kesh::client::Client,
    name: &str,
    present: bool,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let names = c.list_keys("").await.unwrap();
        if names.iter().any(|n| n == name) == present {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Under a label prefix nobody has written yet the token holds no change marker, so an
/// instance's polls find none; the first create elsewhere must still reach its listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_change_marker_under_a_prefix_is_seen() {
    let prefix = format!("first-{}/", harness::name("p").as_str());
    let (a, b) = two_servers_with(
        &harness::tokens().listing,
        &format!("    prefix: {prefix}\n"),
    );
    // Several of B's polls find no marker.
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.client().create_key("first").await.unwrap();
    let took = listed_within(&b.client(), "first", true, Duration::from_secs(1))
        .await
        .expect("the other instance lists the first key under a new prefix within 1 s");
    harness::report(&format!(
        "listing: the first key under a new prefix listed on the other instance after {took:?}"
    ));
}

/// 20 races of 20 creates of one name across both instances: exactly one wins, and each
/// instance lists the name at once (each answered for it, as a success or "already exists").
/// A create on one instance alone is listed by the other within a second, and so is a delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_follow_creates_and_deletes_across_instances_on_softhsm() {
    listings_follow_creates_and_deletes(&harness::tokens().listing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_follow_creates_and_deletes_across_instances_on_kryoptic() {
    listings_follow_creates_and_deletes(&harness::kryoptic_tokens().listing).await;
}

async fn listings_follow_creates_and_deletes(token: &EphemeralToken) {
    let (a, b) = two_servers(token);
    let (ca, cb) = (a.client(), b.client());
    let bound = Duration::from_secs(1);
    let mut slowest = Duration::ZERO;
    for round in 0..20 {
        let name = harness::name(&format!("race-{round}")).as_str().to_owned();
        let creates = (0..20).map(|i| {
            let c = if i % 2 == 0 { &ca } else { &cb };
            c.create_key(&name)
        });
        let outcomes = futures_util::future::join_all(creates).await;
        let wins = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {outcomes:?}");
        for o in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            let api = o.api().unwrap_or_else(|| panic!("{o}"));
            assert_eq!(
                (api.status, api.message.as_ref()),
                (400, "key already exists")
            );
        }
        for (who, c) in [("A", &ca), ("B", &cb)] {
            assert!(
                c.list_keys("").await.unwrap().contains(&name),
                "round {round}: {who} answered for {name} but does not list it"
            );
        }

        // Deleted on one, gone from the other's listing within the bound.
        let (deleter, other) = if round % 2 == 0 {
            (&ca, &cb)
        } else {
            (&cb, &ca)
        };
        deleter.delete_key(&name).await.unwrap();
        assert!(!deleter.list_keys("").await.unwrap().contains(&name));
        let took = listed_within(other, &name, false, bound)
            .await
            .unwrap_or_else(|| panic!("round {round}: {name} still listed after {bound:?}"));
        slowest = slowest.max(took);

        // Created on one only, listed by the other within the bound.
        let solo = harness::name(&format!("solo-{round}")).as_str().to_owned();
        deleter.create_key(&solo).await.unwrap();
        let took = listed_within(other, &solo, true, bound)
            .await
            .unwrap_or_else(|| panic!("round {round}: {solo} not listed after {bound:?}"));
        slowest = slowest.max(took);
    }
    harness::report(&format!(
        "listing: {}: 20 rounds across two instances; slowest cross-instance listing change {slowest:?}",
        harness::backend_of(token).name()
    ));
}

/// Past 1,024 keys a listing is still whole and consistent while the other instance creates
/// and deletes keys: every stable key in every listing, sorted, no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_past_1024_keys_stay_whole_while_keys_churn_elsewhere() {
    const STABLE: usize = 1030;
    let token = harness::tokens().listing_bulk.clone();
    harness::write_ready_keys(&token, (0..STABLE).map(|i| format!("bulk-{i:05}")));
    let (a, b) = two_servers(&token);
    let (ca, cb) = (a.client(), b.client());
    let churn = async {
        for i in 0..10 {
            let n = format!("bulk-churn-{i}");
            ca.create_key(&n).await.unwrap();
            ca.delete_key(&n).await.unwrap();
        }
    };
    let check = async {
        let mut listings = 0;
        for _ in 0..20 {
            let names = cb.list_keys("bulk").await.unwrap();
            let mut sorted = names.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(names, sorted, "sorted, without duplicates");
            let stable = names.iter().filter(|n| n.starts_with("bulk-0")).count();
            assert_eq!(stable, STABLE, "every stable key in every listing");
            assert!(names.len() <= STABLE + 2, "{} names", names.len());
            listings += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        listings
    };
    let ((), listings) = tokio::join!(churn, check);
    assert_eq!(listings, 20);
    // And the churn has settled in B's listing: none of it is left.
    let settled = listed_within(&cb, "bulk-churn-9", false, Duration::from_secs(3)).await;
    assert!(settled.is_some(), "B still lists a key A deleted");
}
