//! The `kesh` binary's client commands, `migrate` and `hsm probe`, run as an operator would:
//! the built binary against a `kesh server --config` child on 127.0.0.1 port 0, in human and
//! `--json` mode, with their error exits (non-zero, message on stderr). One file per command
//! family.

use std::path::{Path, PathBuf};

use serde_json::Value;

use kesh::crypto::kes::{self, Algorithm};
use kesh::crypto::kes_key;
use kesh::identity::ApiKey;

use crate::harness::command::{join, kesh_migrate, migration_outcome as outcome, wait_ok};
use crate::harness::{self, b64 as b64d, b64e, kesh, server, ServerCerts};

mod admin;
mod completion;
mod environment;
mod hsm_probe;
mod identity;
mod keys;
mod migrate;

pub(crate) use migrate::KES_VECTOR;

/// A unique key name per call.
fn unique(hint: &str) -> String {
    harness::name(hint).to_string()
}
