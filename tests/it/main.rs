//! kesh's one integration-test binary. `harness` builds keystores and servers; each module
//! tests one capability through the public API.

#![allow(
    unreachable_pub,
    reason = "a test binary has no public API to keep small"
)]

mod api;
mod bench;
mod cli;
mod faults;
mod guide;
mod harness;
mod hostile;
mod keystore;
mod listing;
mod message_aead;
mod packaging;
mod personalities;
mod rotation;
mod soak;
mod soft_dir;
mod vault;
