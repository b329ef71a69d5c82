//! Every server a test starts, through one builder: in process ([`ServerBuilder::start`], a
//! [`TestServer`] on any `KeyStore`) or as a `kesh server --config` child
//! ([`ServerBuilder::spawn`], a [`ServerProcess`] on a keystore section of its config, with
//! policies, config extras, environment, a `pin_file`, the fault shim and its personalities).
//! Certificates come from [`super::certs`]; tests never write a config or start a server
//! themselves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use kesh::client::{Client, Credentials, ServerTrust};
use kesh::config::server::RouteOverride;
use kesh::identity::{ApiKey, Identity};
use kesh::keystore::pkcs11::ephemeral::EphemeralToken;
use kesh::keystore::KeyStore;
use kesh::server::audit::{AuditLog, ErrorLog};
use kesh::server::metrics::Metrics;
use kesh::server::policy::{Authorizer, Policy, PolicyEntry, PolicyName};
use kesh::server::routes::RouteSettings;
use kesh::server::service::Service;
use kesh::server::tls::ClientAuth;
use kesh::server::{Server, ServerHandle, ServerParts};
use time::OffsetDateTime;

use super::certs::{read_certificate, ServerCerts};
use super::command::{kesh, kesh_cmd, Run, BIN};
use super::shim::{shim_calls, shim_counts, shim_path};
use super::Store;

/// A new server: soft keystore in memory, no policies, an API-key admin.
pub fn server() -> ServerBuilder {
    ServerBuilder::default()
}

/// One policy of a server.
pub struct TestPolicy {
    pub name: &'static str,
    pub allow: Vec<&'static str>,
    pub deny: Vec<&'static str>,
    pub identities: Vec<Identity>,
}

impl TestPolicy {
    /// A policy allowing `allow` (denying nothing) to `identities`.
    pub fn allowing(
        name: &'static str,
        allow: &[&'static str],
        identities: impl IntoIterator<Item = Identity>,
    ) -> Self {
        TestPolicy {
            name,
            allow: allow.to_vec(),
            deny: Vec::new(),
            identities: identities.into_iter().collect(),
        }
    }
}

enum Keystore {
    /// In memory (in process), `soft: {}` (child).
    Soft,
    /// In process only: a keystore under test, kept alive with the server.
    Store(Store),
    /// In process only.
    Dyn(Arc<dyn KeyStore>),
    /// Child only: the lines under `keystore:`, indented.
    Yaml(String),
    /// Child only: `pkcs11:` on `token`, its PIN in a `pin_file`, with these settings.
    Pkcs11 {
        token: Arc<EphemeralToken>,
        settings: serde_yaml::Mapping,
    },
}

/// The fault shim in place of the token's module.
struct Shim {
    rules: String,
    personality: Option<&'static str>,
}

pub struct ServerBuilder {
    keystore: Keystore,
    policies: Vec<TestPolicy>,
    routes: BTreeMap<String, RouteOverride>,
    client_auth: ClientAuth,
    max_connections: usize,
    admin: Option<String>,
    config: String,
    env: Vec<(String, String)>,
    tls_files: Option<(PathBuf, PathBuf)>,
    shim: Option<Shim>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            keystore: Keystore::Soft,
            policies: Vec::new(),
            routes: BTreeMap::new(),
            client_auth: ClientAuth::AnyCertificate,
            max_connections: kesh::server::DEFAULT_MAX_CONNECTIONS,
            admin: None,
            config: String::new(),
            env: Vec::new(),
            tls_files: None,
            shim: None,
        }
    }
}

impl ServerBuilder {
    /// Serves a keystore under test (in process).
    pub fn store(mut self, store: Store) -> Self {
        self.keystore = Keystore::Store(store);
        self
    }

    /// Serves any keystore (in process).
    pub fn keystore(mut self, ks: Arc<dyn KeyStore>) -> Self {
        self.keystore = Keystore::Dyn(ks);
        self
    }

    /// The child's `keystore:` section, as indented lines (`"  soft: {}\n"`).
    pub fn keystore_yaml(mut self, yaml: &str) -> Self {
        self.keystore = Keystore::Yaml(yaml.to_owned());
        self
    }

    /// The child serves `token` through `pkcs11:`, its PIN in a `pin_file` (mode 0600).
    pub fn pkcs11(mut self, token: &Arc<EphemeralToken>) -> Self {
        self.keystore = Keystore::Pkcs11 {
            token: token.clone(),
            settings: serde_yaml::Mapping::new(),
        };
        self
    }

    /// [`Self::pkcs11`] on a token in a SoftHSM directory of its own, which the child gets as
    /// its `SOFTHSM2_CONF`.
    pub fn pkcs11_private(self, private: &super::softhsm::PrivateToken) -> Self {
        let conf = private.conf.to_str().expect("a UTF-8 path").to_owned();
        self.pkcs11(&private.token).env("SOFTHSM2_CONF", &conf)
    }

    /// One more `pkcs11:` setting (`sessions`, `session_wait`, …).
    pub fn pkcs11_setting(mut self, key: &str, value: impl Into<serde_yaml::Value>) -> Self {
        match &mut self.keystore {
            Keystore::Pkcs11 { settings, .. } => {
                settings.insert(key.into(), value.into());
            }
            _ => panic!("pkcs11_setting before pkcs11(token)"),
        }
        self
    }

    /// `pkcs11:` settings from a profile; module, token and PIN stay the builder's.
    pub fn pkcs11_settings(mut self, profile: serde_yaml::Mapping) -> Self {
        match &mut self.keystore {
            Keystore::Pkcs11 { settings, .. } => settings.extend(profile),
            _ => panic!("pkcs11_settings before pkcs11(token)"),
        }
        self
    }

    /// Loads the token's module through the fault shim, which applies `rules` from its first
    /// call and counts calls ([`ServerProcess::calls`]).
    pub fn fault_shim(mut self, rules: &str) -> Self {
        self.shim = Some(Shim {
            rules: rules.to_owned(),
            personality: self.shim.and_then(|s| s.personality),
        });
        self
    }

    /// The shim answers as `profile`'s vendor module (`KESH_SHIM_PERSONALITY`).
    pub fn shim_personality(mut self, profile: &'static str) -> Self {
        let rules = self.shim.map(|s| s.rules).unwrap_or_default();
        self.shim = Some(Shim {
            rules,
            personality: Some(profile),
        });
        self
    }

    pub fn policy(mut self, policy: TestPolicy) -> Self {
        self.policies.push(policy);
        self
    }

    pub fn policies(mut self, policies: impl IntoIterator<Item = TestPolicy>) -> Self {
        self.policies.extend(policies);
        self
    }

    /// An `api:` route override (in process): `skip_auth`, and a deadline other than the
    /// default.
    pub fn route(mut self, path: &str, skip_auth: bool, timeout: Option<Duration>) -> Self {
        self.routes
            .insert(path.to_owned(), RouteOverride { skip_auth, timeout });
        self
    }

    /// In process: how client certificates are checked (`tls.auth`).
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = auth;
        self
    }

    /// In process: the connection limit.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// The child's `admin.identity` as written (`disabled`, `${VAR}`); else a generated API key.
    pub fn admin_identity(mut self, identity: &str) -> Self {
        self.admin = Some(identity.to_owned());
        self
    }

    /// YAML the child's config carries before `keystore:` (policies, keys, log, api).
    pub fn config(mut self, yaml: &str) -> Self {
        self.config.push_str(yaml);
        self
    }

    /// A variable in the child's environment (for the config's `${VAR}`s).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The child serves this self-signed key and certificate, and clients trust exactly it.
    pub fn tls_files(mut self, key: &Path, cert: &Path) -> Self {
        self.tls_files = Some((key.to_owned(), cert.to_owned()));
        self
    }

    /// A server in this process on 127.0.0.1:0; shut down on drop.
    pub async fn start(self) -> TestServer {
        assert!(
            self.config.is_empty() && self.env.is_empty() && self.shim.is_none(),
            "config, env and the fault shim are for `kesh server` children (spawn)"
        );
        let (ks, store): (Arc<dyn KeyStore>, _) = match self.keystore {
            Keystore::Soft => (
                Arc::new(kesh::keystore::soft::SoftKeyStore::in_memory()),
                None,
            ),
            Keystore::Store(store) => (store.ks.clone(), Some(store)),
            Keystore::Dyn(ks) => (ks, None),
            Keystore::Yaml(_) | Keystore::Pkcs11 { .. } => {
                panic!("a keystore section is for `kesh server` children (spawn)")
            }
        };
        let admin = ApiKey::generate().unwrap();
        let certs = ServerCerts::new();
        let metrics = Arc::new(Metrics::new());
        let routes = RouteSettings::new(&self.routes);
        let service = Arc::new(Service::new(
            ks,
            authorizer(&admin.identity(), &self.policies),
            metrics.clone(),
        ));
        let tls = kesh::server::tls::server_config(
            certs.chain.clone(),
            certs.private_key(),
            &self.client_auth,
            !routes.any_skip_auth(),
        )
        .unwrap();
        let parts = ServerParts {
            service,
            tls,
            routes,
            audit: AuditLog::new(metrics.clone(), false),
            errors: ErrorLog::new(metrics, true),
        };
        let (addr, handle, _) =
            serve(parts, "127.0.0.1:0".parse().unwrap(), self.max_connections).await;
        TestServer {
            addr,
            handle,
            certs,
            admin,
            _store: store,
        }
    }

    /// A `kesh server --config` child that serves; panics with its log when it does not.
    pub fn spawn(self) -> ServerProcess {
        self.try_spawn()
            .unwrap_or_else(|log| panic!("kesh server did not start:\n{log}"))
    }

    /// [`ServerBuilder::spawn`]; `Err` holds the server's stderr when it exits without serving.
    pub fn try_spawn(self) -> Result<ServerProcess, String> {
        let mut srv = self.prepare();
        srv.start()?;
        Ok(srv)
    }

    /// Writes the child's certificates, config and PIN, and starts nothing
    /// ([`ServerProcess::start`], [`ServerProcess::command`]).
    pub fn prepare(self) -> ServerProcess {
        assert!(
            self.policies.is_empty()
                && self.routes.is_empty()
                && self.max_connections == kesh::server::DEFAULT_MAX_CONNECTIONS,
            "policies, routes and limits of a child go in its config (config)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut files = ServerCerts::new().write(d);
        if let Some((key, cert)) = &self.tls_files {
            std::fs::copy(key, &files.key).unwrap();
            std::fs::copy(cert, &files.cert).unwrap();
            files.ca = files.cert.clone();
        }
        let admin = ApiKey::generate().unwrap();
        let mut env = self.env;
        let keystore = match self.keystore {
            Keystore::Soft => "  soft: {}\n".to_owned(),
            Keystore::Yaml(yaml) => yaml,
            Keystore::Pkcs11 {
                token,
                mut settings,
            } => {
                super::write_private(&d.join("pin"), token.pin().expose());
                let module = match &self.shim {
                    Some(_) => shim_path(),
                    None => token.module.clone(),
                };
                settings.remove("pin");
                settings.insert("module".into(), module.display().to_string().into());
                settings.insert("token".into(), token.label.clone().into());
                settings.insert(
                    "pin_file".into(),
                    d.join("pin").display().to_string().into(),
                );
                let section = serde_yaml::Mapping::from_iter([("pkcs11".into(), settings.into())]);
                serde_yaml::to_string(&section)
                    .unwrap()
                    .lines()
                    .map(|l| format!("  {l}\n"))
                    .collect()
            }
            Keystore::Store(_) | Keystore::Dyn(_) => {
                panic!("an in-process keystore cannot serve a `kesh server` child (start)")
            }
        };
        if let Some(shim) = &self.shim {
            std::fs::write(d.join("faults"), &shim.rules).unwrap();
            env.push(("KESH_SHIM_CONTROL".into(), path_text(&d.join("faults"))));
            env.push(("KESH_SHIM_STATS".into(), path_text(&d.join("calls"))));
            if let Some(p) = shim.personality {
                env.push(("KESH_SHIM_PERSONALITY".into(), p.to_owned()));
            }
        }
        let srv = ServerProcess {
            child: None,
            addr: String::new(),
            keystore_line: String::new(),
            ca: files.ca,
            admin,
            admin_identity: self.admin,
            tls: (files.key, files.cert),
            keystore,
            env,
            dir,
        };
        srv.write_config(&self.config);
        srv
    }
}

fn path_text(p: &Path) -> String {
    p.display().to_string()
}

fn authorizer(admin: &Identity, policies: &[TestPolicy]) -> Authorizer {
    let mut map = BTreeMap::new();
    for p in policies {
        map.insert(
            PolicyName::new(p.name).unwrap(),
            PolicyEntry {
                policy: Policy {
                    allow: p.allow.iter().map(|s| s.to_string()).collect(),
                    deny: p.deny.iter().map(|s| s.to_string()).collect(),
                },
                identities: p.identities.clone(),
            },
        );
    }
    Authorizer::new(admin.clone(), map, OffsetDateTime::now_utc()).unwrap()
}

/// Binds `parts` on `addr` and serves them on a task: the address it got, its handle, and the
/// task (which ends after [`ServerHandle::shutdown`]).
pub async fn serve(
    parts: ServerParts,
    addr: SocketAddr,
    max_connections: usize,
) -> (
    SocketAddr,
    ServerHandle,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let server = Server::bind(addr, parts)
        .await
        .unwrap()
        .with_max_connections(max_connections);
    let addr = server.local_addr().unwrap();
    let handle = server.handle();
    (addr, handle, tokio::spawn(server.run()))
}

/// A server running in this process on 127.0.0.1:0; shut down on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: ServerHandle,
    pub certs: ServerCerts,
    pub admin: ApiKey,
    _store: Option<Store>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

impl TestServer {
    /// A client with `creds`, trusting the test CA.
    pub fn client(&self, creds: Credentials) -> Client {
        Client::new(
            &self.addr.to_string(),
            creds,
            ServerTrust::Roots(vec![self.certs.ca.clone()]),
        )
        .unwrap()
    }

    /// A client as the admin.
    pub fn admin(&self) -> Client {
        self.client(Credentials::ApiKey(
            ApiKey::parse(&self.admin.expose_text()).unwrap(),
        ))
    }

    pub fn admin_id(&self) -> String {
        self.admin.identity().to_string()
    }
}

/// What a `kesh server` prints before it serves.
#[derive(Debug, Default)]
pub struct Banner {
    /// `host:port` of the API.
    pub addr: String,
    /// The keystore line, after `Keystore`.
    pub keystore: String,
    /// `--dev` only: the admin's API key and identity.
    pub api_key: Option<String>,
    pub admin: Option<String>,
}

impl Banner {
    /// Reads a child's banner up to "Server is up and running"; `None` when it exits without
    /// serving. Keeps draining stdout afterwards: audit records go there, and a full pipe
    /// would stall the server.
    pub fn read(child: &mut Child) -> Option<Banner> {
        use std::io::{BufRead, BufReader};
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let (mut banner, mut addr, mut up) = (Banner::default(), None, false);
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("API Key") {
                banner.api_key = Some(rest.trim().to_owned());
            } else if let Some(rest) = line.strip_prefix("Admin") {
                banner.admin = Some(rest.trim().to_owned());
            } else if let Some(rest) = line.strip_prefix("API         · https://") {
                addr = Some(rest.trim().to_owned());
            } else if let Some(rest) = line.strip_prefix("Keystore") {
                banner.keystore = rest.trim().to_owned();
            } else if line.contains("Server is up and running") {
                up = true;
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        banner.addr = addr?;
        up.then_some(banner)
    }
}

/// Spawns a `kesh server` command (stdin closed, stdout piped) and reads its banner; `None`
/// (the child reaped) when it exits without serving.
pub fn start_child(cmd: &mut Command) -> Option<(Child, Banner)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kesh server");
    match Banner::read(&mut child) {
        Some(banner) => Some((child, banner)),
        None => {
            let _ = child.wait();
            None
        }
    }
}

/// Sends `sig` (`-HUP`, `-TERM`) to a child.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A `kesh server --config` child in its own directory (config, certificates, PIN, shim rules
/// and counts, stderr); restartable on the same config, killed on drop.
pub struct ServerProcess {
    child: Option<Child>,
    pub addr: String,
    /// The banner's keystore line.
    pub keystore_line: String,
    /// The certificate clients trust.
    pub ca: PathBuf,
    pub admin: ApiKey,
    admin_identity: Option<String>,
    tls: (PathBuf, PathBuf),
    keystore: String,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ServerProcess {
    /// (Re)writes the config with `extra` before `keystore:` (a policy change to reload).
    pub fn write_config(&self, extra: &str) {
        let admin = self
            .admin_identity
            .clone()
            .unwrap_or_else(|| self.admin.identity().to_string());
        std::fs::write(
            self.config_path(),
            format!(
                "address: 127.0.0.1:0\nadmin:\n  identity: {admin}\ntls:\n  key: {}\n  cert: {}\n{extra}keystore:\n{}",
                self.tls.0.display(),
                self.tls.1.display(),
                self.keystore
            ),
        )
        .unwrap();
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("kesh.yaml")
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `kesh server --config …` with the server's environment; stderr appends to its log.
    pub fn command(&self) -> Command {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("server")
            .arg("--config")
            .arg(self.config_path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(stderr);
        cmd
    }

    /// Starts the server (again, after [`ServerProcess::stop`]); `Err` holds its stderr when
    /// it exits without serving.
    pub fn start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "already running");
        let Some((child, banner)) = start_child(&mut self.command()) else {
            return Err(self.stderr());
        };
        self.child = Some(child);
        self.addr = banner.addr;
        self.keystore_line = banner.keystore;
        Ok(())
    }

    /// Kills the server and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the server runs")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server runs").id()
    }

    /// Sends `sig` (`-HUP`, `-TERM`) to the server.
    pub fn signal(&self, sig: &str) {
        signal(self.child.as_ref().expect("the server runs"), sig);
    }

    /// What the server wrote to stderr so far (its error and policy log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// A library client as the admin.
    pub fn client(&self) -> Client {
        self.client_as(Credentials::ApiKey(
            ApiKey::parse(&self.admin.expose_text()).unwrap(),
        ))
    }

    /// A library client with other credentials, trusting the server's CA.
    pub fn client_as(&self, creds: Credentials) -> Client {
        Client::new(
            &self.addr,
            creds,
            ServerTrust::Roots(vec![read_certificate(&self.ca)]),
        )
        .unwrap()
    }

    /// The admin's client environment, verifying the server against its CA.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KES_SERVER", self.addr.clone()),
            ("KES_API_KEY", self.admin.expose_text().to_string()),
            ("SSL_CERT_FILE", self.ca.display().to_string()),
        ]
    }

    /// `kesh <args>` as the admin.
    pub fn run(&self, args: &[&str]) -> Run {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        kesh(&env, args)
    }

    /// `kesh <args>` as the admin, running in the background (`kesh log`).
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        kesh_cmd(&env, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Replaces the fault shim's rules.
    pub fn inject(&self, rules: &str) {
        std::fs::write(self.dir.path().join("faults"), rules).unwrap();
    }

    /// Calls of `function` that reached the shim so far (it writes its counts within 20 ms).
    pub async fn calls(&self, function: &str) -> u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.calls_now(function)
    }

    /// The shim's count of `function` as last written.
    pub fn calls_now(&self, function: &str) -> u64 {
        shim_calls(&self.dir.path().join("calls"), function)
    }

    /// Every function's count at the shim (as [`Self::calls`], after its 100 ms).
    pub async fn all_calls(&self) -> std::collections::BTreeMap<String, u64> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        shim_counts(&self.dir.path().join("calls"))
    }

    /// Replaces the PIN the config's `pin_file:` names.
    pub fn write_pin(&self, pin: &str) {
        std::fs::write(self.dir.path().join("pin"), pin).unwrap();
    }

    /// Whether `/v1/status` says the keystore is unreachable.
    pub async fn status_unreachable(&self) -> bool {
        let r = self
            .client()
            .send(Method::GET, "/v1/status", None, None)
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["keystore_unreachable"] == serde_json::Value::Bool(true)
    }
}
