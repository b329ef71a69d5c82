//! Builds the two keystores the suites run against, and small helpers.
//!
//! SoftHSM is required: a missing module fails the test with an install hint, never a skip.

#![allow(dead_code)]

use std::sync::Arc;

use kesh::keystore::pkcs11::ephemeral::EphemeralToken;
use kesh::keystore::pkcs11::Pkcs11KeyStore;
use kesh::keystore::soft::SoftKeyStore;
use kesh::keystore::{KeyStore, Provenance};
use kesh::name::KeyName;

/// A keystore under test; keeps its token alive.
pub struct Store {
    pub ks: Arc<dyn KeyStore>,
    pub pkcs11: Option<(Pkcs11KeyStore, Arc<EphemeralToken>)>,
}

impl std::ops::Deref for Store {
    type Target = dyn KeyStore;
    fn deref(&self) -> &Self::Target {
        &*self.ks
    }
}

pub fn soft() -> Store {
    Store {
        ks: Arc::new(SoftKeyStore::in_memory()),
        pkcs11: None,
    }
}

impl Store {
    /// The backend as the conformance matrix names it: `soft`, or the pkcs11 profile.
    pub fn backend_name(&self) -> String {
        match &self.pkcs11 {
            Some((ks, _)) => ks.settings().profile.name.to_owned(),
            None => "soft".to_owned(),
        }
    }

    /// A store on the same backend (and token) whose creates use `scheme`.
    pub async fn creating(&self, scheme: kesh::keystore::Scheme) -> Store {
        match &self.pkcs11 {
            Some((_, token)) => pkcs11_with(token.clone(), |c| c.scheme = Some(scheme)).await,
            None => Store {
                ks: Arc::new(SoftKeyStore::in_memory().with_scheme(scheme)),
                pkcs11: None,
            },
        }
    }
}

fn token() -> EphemeralToken {
    EphemeralToken::create().unwrap_or_else(|e| panic!("SoftHSM is required for this test: {e}"))
}

/// The suite's tokens, all made before any test touches one: SoftHSM grows its slot list
/// after `C_InitToken`, and doing that while other threads use the module crashes it. Tests
/// share `shared` (every test uses unique key names); `bulk` holds the 10,000-key test apart;
/// `processes` is written by child processes, whose writes make SoftHSM in other processes
/// briefly misread that token, so the in-process tests stay off it.
pub struct Tokens {
    pub shared: Arc<EphemeralToken>,
    pub bulk: Arc<EphemeralToken>,
    pub processes: Arc<EphemeralToken>,
    /// Used by `kesh server` processes that load SoftHSM through the fault shim.
    pub faults: Arc<EphemeralToken>,
    /// Written only by the `kesh migrate` and `kesh server` children of the CLI test.
    pub migrate: Arc<EphemeralToken>,
    /// Written only by the `kesh migrate` and `kesh server` children of the Vault tests.
    pub vault: Arc<EphemeralToken>,
    /// Only logged into by `kesh hsm probe` children (session objects only): no other
    /// process writes to it, so its token file is never read mid-rewrite.
    pub probe: Arc<EphemeralToken>,
    /// The server and `kesh migrate` of the MinIO guide's walk-through (`guide.rs`).
    pub guide: Arc<EphemeralToken>,
    /// Two `kesh server` processes racing creates and deletes (`listing.rs`).
    pub listing: Arc<EphemeralToken>,
    /// Two `kesh server` processes listing past 1,024 keys while one churns (`listing.rs`).
    pub listing_bulk: Arc<EphemeralToken>,
    /// One per vendor personality of the fault shim, each used by one server process at a
    /// time (`personalities.rs`).
    pub personalities: std::collections::BTreeMap<&'static str, Arc<EphemeralToken>>,
}

/// The vendor personalities the shim emulates, one per profile in `hsm-config/profiles/`
/// (SoftHSM's excepted).
pub const PERSONALITIES: [&str; 5] = ["cloudhsm", "luna", "nshield", "utimaco", "yubihsm"];

pub fn tokens() -> &'static Tokens {
    static TOKENS: std::sync::OnceLock<Tokens> = std::sync::OnceLock::new();
    TOKENS.get_or_init(|| {
        // `softhsm-tests/run` makes the shared token the way an operator would (softhsm2-util).
        let shared = match (
            std::env::var("KESH_TEST_TOKEN_LABEL"),
            std::env::var("KESH_TEST_TOKEN_PIN"),
        ) {
            (Ok(label), Ok(pin)) => EphemeralToken::existing(label, kesh::secret::Pin::new(pin))
                .unwrap_or_else(|e| panic!("SoftHSM is required for this test: {e}")),
            _ => token(),
        };
        Tokens {
            shared: Arc::new(shared),
            bulk: Arc::new(token()),
            processes: Arc::new(token()),
            faults: Arc::new(token()),
            migrate: Arc::new(token()),
            vault: Arc::new(token()),
            probe: Arc::new(token()),
            guide: Arc::new(token()),
            listing: Arc::new(token()),
            listing_bulk: Arc::new(token()),
            personalities: PERSONALITIES
                .iter()
                .map(|p| (*p, Arc::new(token())))
                .collect(),
        }
    })
}

pub async fn pkcs11() -> Store {
    pkcs11_on(tokens().shared.clone()).await
}

pub async fn pkcs11_on(token: Arc<EphemeralToken>) -> Store {
    pkcs11_with(token, |_| {}).await
}

/// A keystore on `token` with its configuration adjusted by `adjust`.
pub async fn pkcs11_with(
    token: Arc<EphemeralToken>,
    adjust: impl FnOnce(&mut kesh::keystore::pkcs11::Pkcs11Config),
) -> Store {
    let mut cfg = token.config();
    adjust(&mut cfg);
    let ks = Pkcs11KeyStore::open(cfg)
        .await
        .expect("open pkcs11 keystore");
    Store {
        ks: Arc::new(ks.clone()),
        pkcs11: Some((ks, token)),
    }
}

/// A raw session on the token, logged in, as an auditor's tool would open one.
pub fn raw_session(
    token: &EphemeralToken,
) -> (cryptoki::context::Pkcs11, cryptoki::session::Session) {
    use kesh::keystore::pkcs11::{device, TokenSelector};
    let ctx = cryptoki::context::Pkcs11::new(&token.module).unwrap();
    device::initialize(&ctx).unwrap();
    let slot = device::find_slot(&ctx, &TokenSelector::Label(token.label.clone())).unwrap();
    let s = ctx.open_rw_session(slot).unwrap();
    device::login(&s, token.pin()).unwrap();
    (ctx, s)
}

/// Writes ready gcm keys named `names` (under the `kesh/` prefix) straight to the token in
/// kesh's layout: bulk loads through the create protocol would be quadratic (each create
/// searches the whole token).
pub fn write_ready_keys(token: &EphemeralToken, names: impl IntoIterator<Item = String>) {
    use kesh::keystore::pkcs11::objects;
    let (_ctx, s) = raw_session(token);
    for (i, name) in names.into_iter().enumerate() {
        let meta = objects::Meta::new(
            objects::Role::Key,
            &format!("{i:016x}"),
            kesh::keystore::Scheme::Gcm,
            kesh::crypto::kes::Algorithm::Aes256,
            &who(),
        )
        .ready();
        let label = format!("kesh/{name}");
        let t = objects::master_template(&label, &meta, kesh::keystore::Scheme::Gcm, None);
        s.generate_key(&cryptoki::mechanism::Mechanism::AesKeyGen, &t)
            .unwrap();
    }
}

/// The token a child process was told to use (`KESH_CHILD_TOKEN`, `KESH_CHILD_PIN`).
pub fn child_token() -> EphemeralToken {
    let label = std::env::var("KESH_CHILD_TOKEN").expect("KESH_CHILD_TOKEN");
    let pin = std::env::var("KESH_CHILD_PIN").expect("KESH_CHILD_PIN");
    EphemeralToken::existing(label, kesh::secret::Pin::new(pin)).expect("SoftHSM is required")
}

/// Records a figure a test measured (start-up time, index rebuild, recovery): to stderr, and to
/// `KESH_TEST_REPORT` when set, which `softhsm-tests/run` prints after the suite (the test
/// harness shows a passing test's output to nobody).
pub fn report(line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("KESH_TEST_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Writes a file only its owner can read, as a KEK or PIN file must be.
pub fn write_private(path: &std::path::Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A unique key name per call.
pub fn name(hint: &str) -> KeyName {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    KeyName::new(&format!(
        "{hint}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
    .expect("valid name")
}

pub fn who() -> Provenance {
    Provenance::now("3ecfcdf38fcbe141ae26a1030f81e96b753365a46760ae6b578698a97c59fd22")
}

pub fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn(Store)`.
#[macro_export]
macro_rules! on_both_keystores {
    ($($case:ident),* $(,)?) => {
        mod soft {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case($crate::harness::soft()).await } )*
        }
        mod pkcs11 {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case($crate::harness::pkcs11().await).await } )*
        }
    };
}

/// Reads a `kesh server` child's banner up to "Server is up and running" and returns the API
/// address it printed. Keeps draining stdout afterwards: audit records go there, and a full
/// pipe would stall the server.
pub fn wait_for_banner(child: &mut std::process::Child) -> String {
    try_wait_for_banner(child).expect("the server printed its address")
}

/// [`wait_for_banner`], `None` when the server exits without serving.
pub fn try_wait_for_banner(child: &mut std::process::Child) -> Option<String> {
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.expect("banner line");
        if let Some(rest) = line.strip_prefix("API         · https://") {
            addr = Some(rest.trim().to_owned());
        } else if line.contains("Server is up and running") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    addr
}
