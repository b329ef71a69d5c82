//! The KES HTTP API through the front door: a real server on loopback port 0, real mTLS with
//! certificates generated at test time, every route, run on the soft keystore, on SoftHSM and
//! on Kryoptic. One file per subject; the cases every keystore runs are listed here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use kesh::api;
use kesh::client::{errors, Client, ClientError, Credentials, KesError, ServerTrust};
use kesh::config::server::ServerConfig;
use kesh::identity::{ApiKey, Identity};
use kesh::keystore::{DataKey, ImportKey, KeyInfo, KeyStore, KeystoreError, Provenance};
use kesh::name::KeyName;
use kesh::secret::SecretBytes;
use kesh::server::tls::ClientAuth;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::harness::{
    self, assert_empty_ok, assert_error, assert_not_allowed, assert_request_error, b64, b64e,
    client_cert, json, raw_tls, send, server, Store, TestPolicy,
};

mod audit;
mod config;
mod error_responses;
mod keys;
mod limits;
mod metrics;
mod policy;
mod security;
mod tls;

use audit::audit_stream_delivers;
use error_responses::{request_errors_and_limits, typed_errors_round_trip};
use keys::{
    import_kes_key_and_decrypt_kes_ciphertexts, key_lifecycle, minio_startup_and_key_status,
};
use metrics::status_metrics_api_version;
use policy::{policy_and_identity_routes, policy_matrix};
use tls::client_certificate_types;

crate::on_every_keystore!(
    key_lifecycle,
    request_errors_and_limits,
    import_kes_key_and_decrypt_kes_ciphertexts,
    minio_startup_and_key_status,
    typed_errors_round_trip,
    client_certificate_types,
    policy_matrix,
    policy_and_identity_routes,
    status_metrics_api_version,
    audit_stream_delivers,
);

/// A decrypt request's body.
fn decrypt_body(ciphertext: &[u8], context: &[u8]) -> String {
    format!(
        "{{\"ciphertext\":\"{}\",\"context\":\"{}\"}}",
        b64e(ciphertext),
        b64e(context)
    )
}

/// A unique key name per call, as the API takes it.
fn name(hint: &str) -> String {
    harness::name(hint).to_string()
}
