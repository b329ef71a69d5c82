//! Everything the suites share: the keystores they run against (here), the certificates
//! ([`certs`]), every server a test starts ([`server`]: one builder for in-process servers and
//! `kesh server` children), the `kesh` command runner ([`command`]), request-and-assert helpers
//! ([`http`]), the fault shim ([`shim`]) and SoftHSM's configuration file ([`softhsm`]).
//! Test modules must not write certificates, configurations or start servers themselves.
//!
//! Three backends: the soft keystore, SoftHSM and Kryoptic (a second, independent PKCS#11
//! token). Both tokens are required: a missing module fails the test with the command that
//! provides it, never a skip.

#![allow(dead_code)]

pub mod certs;
pub mod command;
pub mod http;
pub mod raw_tls;
pub mod server;
pub mod shim;
pub mod softhsm;

pub use certs::{client_cert, ServerCerts};
pub use command::kesh;
pub use http::{
    assert_empty_ok, assert_error, assert_not_allowed, assert_request_error, json, send,
};
pub use server::{server, ServerBuilder, ServerProcess, TestPolicy};

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
    pub backend: Backend,
}

/// What a keystore under test is, and what it lacks by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Soft,
    SoftHsm,
    Kryoptic,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Soft => "soft",
            Backend::SoftHsm => "softhsm",
            Backend::Kryoptic => "kryoptic",
        }
    }

    /// Whether the `kwp` scheme (CKM_AES_KEY_WRAP_PAD) works. Kryoptic offers RFC 5649 only
    /// under its PKCS#11 3.0 name, CKM_AES_KEY_WRAP_KWP, which kesh does not use.
    pub fn kwp(self) -> bool {
        self != Backend::Kryoptic
    }

    /// Says that a case is not run on this backend because the backend lacks `what` by
    /// design: in the test's output, and in the run's report (`softhsm-tests/run` prints it),
    /// since a passing test's output is shown to nobody.
    pub fn unsupported(self, what: &str) {
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        report(&format!(
            "unsupported-by-design: {what} on {} ({test} checked the refusal instead)",
            self.name()
        ));
    }
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
        backend: Backend::Soft,
    }
}

impl Store {
    /// A store on the same backend (and token) whose creates use `scheme`.
    pub async fn creating(&self, scheme: kesh::keystore::Scheme) -> Store {
        match &self.pkcs11 {
            Some((_, token)) => pkcs11_with(token.clone(), |c| c.scheme = Some(scheme)).await,
            None => Store {
                ks: Arc::new(SoftKeyStore::in_memory().with_scheme(scheme)),
                pkcs11: None,
                backend: Backend::Soft,
            },
        }
    }
}

/// How to get SoftHSM, for a test that finds it missing.
const SOFTHSM_HINT: &str = "SoftHSM is required for this test: run softhsm-tests/run, which \
    installs it and makes the suite's tokens (or `apt-get install softhsm2`)";

fn token() -> EphemeralToken {
    EphemeralToken::create().unwrap_or_else(|e| panic!("{SOFTHSM_HINT}: {e}"))
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
    /// Used by `kesh server` processes that load SoftHSM through the fault shim; in a token
    /// directory of its own, so that their recoveries re-read only it.
    pub faults: softhsm::PrivateToken,
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
    /// Two `kesh server` processes rotating one key on a schedule (`rotation.rs`).
    pub rotation: Arc<EphemeralToken>,
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
                .unwrap_or_else(|e| panic!("{SOFTHSM_HINT}: {e}")),
            _ => token(),
        };
        Tokens {
            shared: Arc::new(shared),
            bulk: Arc::new(token()),
            processes: Arc::new(token()),
            faults: softhsm::PrivateToken::create("faults"),
            migrate: Arc::new(token()),
            vault: Arc::new(token()),
            probe: Arc::new(token()),
            guide: Arc::new(token()),
            listing: Arc::new(token()),
            listing_bulk: Arc::new(token()),
            rotation: Arc::new(token()),
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
    let mut cfg = config(&token);
    adjust(&mut cfg);
    let ks = Pkcs11KeyStore::open(cfg)
        .await
        .expect("open pkcs11 keystore");
    Store {
        ks: Arc::new(ks.clone()),
        backend: backend_of(&token),
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

/// Which module a token lives on.
pub fn backend_of(token: &EphemeralToken) -> Backend {
    match kryoptic_module() {
        Some(m) if m == token.module => Backend::Kryoptic,
        _ => Backend::SoftHsm,
    }
}

/// The keystore configuration a test starts from: the profile of the token's module.
pub fn config(token: &EphemeralToken) -> kesh::keystore::pkcs11::Pkcs11Config {
    let mut cfg = token.config();
    if backend_of(token) == Backend::Kryoptic {
        cfg.profile = kesh::keystore::pkcs11::profile::by_name("kryoptic");
    }
    cfg
}

/// The token a child process was told to use (`KESH_CHILD_TOKEN`, `KESH_CHILD_PIN`, and
/// `KESH_CHILD_MODULE` when it is not SoftHSM's).
pub fn child_token() -> EphemeralToken {
    let label = std::env::var("KESH_CHILD_TOKEN").expect("KESH_CHILD_TOKEN");
    let pin = kesh::secret::Pin::new(std::env::var("KESH_CHILD_PIN").expect("KESH_CHILD_PIN"));
    match std::env::var_os("KESH_CHILD_MODULE") {
        Some(module) => EphemeralToken::existing_on(module.into(), label, pin),
        None => EphemeralToken::existing(label, pin).expect("SoftHSM is required"),
    }
}

/// How to get Kryoptic, for a test that needs it and finds it missing.
const KRYOPTIC_HINT: &str = "Kryoptic is required for this test: run softhsm-tests/run, which \
    builds it and makes its tokens, or make them with `softhsm-tests/kryoptic tokens DIR PIN \
    kesh-shared kesh-processes kesh-listing` and export KESH_TEST_KRYOPTIC_MODULE (the path `softhsm-tests/kryoptic \
    build` prints), KRYOPTIC_CONF (DIR/kryoptic.toml) and KESH_TEST_KRYOPTIC_PIN";

/// The Kryoptic module `softhsm-tests/run` built, if it says so.
fn kryoptic_module() -> Option<std::path::PathBuf> {
    std::env::var_os("KESH_TEST_KRYOPTIC_MODULE").map(Into::into)
}

/// The Kryoptic tokens `softhsm-tests/run` made (`softhsm-tests/kryoptic tokens`): one for
/// the in-process suites, one that child processes write to, as with SoftHSM's.
pub struct KryopticTokens {
    pub shared: Arc<EphemeralToken>,
    pub processes: Arc<EphemeralToken>,
    /// Two `kesh server` processes racing creates and deletes (`listing.rs`).
    pub listing: Arc<EphemeralToken>,
}

pub fn kryoptic_tokens() -> &'static KryopticTokens {
    static TOKENS: std::sync::OnceLock<KryopticTokens> = std::sync::OnceLock::new();
    TOKENS.get_or_init(|| {
        let module = kryoptic_module().filter(|m| m.exists()).unwrap_or_else(|| {
            panic!("{KRYOPTIC_HINT} (KESH_TEST_KRYOPTIC_MODULE unset or missing)")
        });
        let conf = std::env::var_os("KRYOPTIC_CONF")
            .map(std::path::PathBuf::from)
            .filter(|c| c.exists())
            .unwrap_or_else(|| panic!("{KRYOPTIC_HINT} (KRYOPTIC_CONF unset or missing)"));
        let pin = std::env::var("KESH_TEST_KRYOPTIC_PIN")
            .unwrap_or_else(|_| panic!("{KRYOPTIC_HINT} (KESH_TEST_KRYOPTIC_PIN unset)"));
        let token = |label: &str| {
            Arc::new(EphemeralToken::existing_on(
                module.clone(),
                label.to_owned(),
                kesh::secret::Pin::new(pin.clone()),
            ))
        };
        eprintln!("kryoptic: tokens from {}", conf.display());
        KryopticTokens {
            shared: token("kesh-shared"),
            processes: token("kesh-processes"),
            listing: token("kesh-listing"),
        }
    })
}

pub async fn kryoptic() -> Store {
    pkcs11_on(kryoptic_tokens().shared.clone()).await
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

/// The lines of a `keystore:` section for the soft keystore in directory `path`, its keys
/// sealed under the KEK in `kek_file`.
pub fn soft_keystore_section(path: &std::path::Path, kek_file: &std::path::Path) -> String {
    format!(
        "  soft:\n    path: {}\n    kek_file: {}\n",
        path.display(),
        kek_file.display()
    )
}

/// A config holding only that soft keystore: what `kesh migrate --to` takes.
pub fn write_soft_keystore_config(
    config: &std::path::Path,
    path: &std::path::Path,
    kek_file: &std::path::Path,
) {
    let section = soft_keystore_section(path, kek_file);
    std::fs::write(config, format!("keystore:\n{section}")).unwrap();
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
        .decode(s.trim())
        .expect("base64")
}

pub fn b64e(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Generates one `#[tokio::test]` per backend (soft, SoftHSM as `pkcs11`, Kryoptic) for each
/// listed `async fn(Store)`.
#[macro_export]
macro_rules! on_every_keystore {
    ($($case:ident),* $(,)?) => {
        mod soft {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case($crate::harness::soft()).await } )*
        }
        mod pkcs11 {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case($crate::harness::pkcs11().await).await } )*
        }
        mod kryoptic {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case($crate::harness::kryoptic().await).await } )*
        }
    };
}
