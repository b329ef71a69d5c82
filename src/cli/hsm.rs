//! `kesh hsm probe`: the command around [`kesh::keystore::pkcs11::probe`].

use std::path::PathBuf;

use kesh::config::keystore::KeystoreConfig;
use kesh::keystore::pkcs11::probe::{self, IvFinding, ProbeTarget};
use kesh::keystore::pkcs11::TokenSelector;
use kesh::secret::Pin;

use super::output::{self, fields, Table};
use super::Fatal;

#[derive(clap::Args, Debug)]
#[command(
    long_about = "Test what a PKCS#11 module and token can do for kesh.\n\n\
        Lists the slots and tokens; with a token and its PIN, logs in and tries each scheme's \
        mechanisms on temporary session keys (nothing is written to the token): CKM_AES_GCM \
        (gcm), CKM_AES_KEY_WRAP_PAD (kwp), CKM_SHA256_HMAC (kes). Reports who draws GCM IVs \
        and the session limits, and prints a `keystore:` section for the kesh config."
)]
pub(crate) struct ProbeArgs {
    /// A kesh config file: module, token and PIN come from its `keystore: pkcs11:` section.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["module", "token", "serial", "pin_env"])]
    pub config: Option<PathBuf>,
    /// The PKCS#11 module (shared library).
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    pub module: Option<PathBuf>,
    /// The token's label.
    #[arg(long, conflicts_with = "serial")]
    pub token: Option<String>,
    /// The token's serial number.
    #[arg(long)]
    pub serial: Option<String>,
    /// The environment variable holding the user PIN.
    #[arg(long, value_name = "VAR")]
    pub pin_env: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

pub(super) fn probe(args: ProbeArgs) -> Result<(), Fatal> {
    let target = match &args.config {
        Some(path) => {
            let mut section = kesh::migrate::keystore_section(path)?;
            let parsed = KeystoreConfig::from_value(&section);
            kesh::config::env::wipe(&mut section);
            match parsed.map_err(|e| Fatal(format!("{}: {e}", path.display())))? {
                KeystoreConfig::Pkcs11(c) => ProbeTarget {
                    module: c.module,
                    token: Some(c.token),
                    pin: Some(c.pin),
                },
                KeystoreConfig::Soft(_) => {
                    return Err(Fatal(format!(
                        "{}: the keystore is `soft:`, not `pkcs11:`; there is no HSM to probe",
                        path.display()
                    )))
                }
            }
        }
        None => {
            let pin = match &args.pin_env {
                Some(var) => Some(Pin::new(std::env::var(var).map_err(|_| {
                    Fatal(format!(
                        "--pin-env {var}: the variable is not set; export {var}=<PIN>"
                    ))
                })?)),
                None => None,
            };
            ProbeTarget {
                // Invariant: clap requires --module unless --config is given.
                module: args
                    .module
                    .clone()
                    .ok_or_else(|| Fatal("--module is required".into()))?,
                token: match (&args.token, &args.serial) {
                    (Some(l), _) => Some(TokenSelector::Label(l.clone())),
                    (None, Some(s)) => Some(TokenSelector::Serial(s.clone())),
                    (None, None) => None,
                },
                pin,
            }
        }
    };
    let report = probe::probe(&target)?;
    if args.json {
        return output::json(&report);
    }
    fields(&[
        ("Module", report.module.clone()),
        (
            "Library",
            format!(
                "{} {} ({}), Cryptoki {}",
                report.library.manufacturer,
                report.library.version,
                report.library.description,
                report.library.cryptoki_version
            ),
        ),
    ])?;
    output::line("")?;
    let mut t = Table::new(&["Slot", "Token", "Serial", "Manufacturer", "Model"]);
    for s in &report.slots {
        match &s.token {
            Some(tok) => t.row(vec![
                s.slot.to_string(),
                if tok.initialized {
                    tok.label.clone()
                } else {
                    "(not initialized)".into()
                },
                tok.serial.clone(),
                tok.manufacturer.clone(),
                tok.model.clone(),
            ]),
            None => t.row(vec![s.slot.to_string(), "(no token)".into()]),
        }
    }
    t.print()?;
    let Some(tok) = &report.token else {
        output::line("\nName a token (--token LABEL or --serial S) and its PIN (--pin-env VAR), or give --config, to test it.")?;
        return Ok(());
    };
    output::line("")?;
    let mut rows = vec![
        (
            "Token",
            format!(
                "'{}' (serial {}) in slot {}",
                tok.summary.label, tok.summary.serial, tok.slot
            ),
        ),
        ("Logged in", yes(tok.logged_in)),
    ];
    for s in &tok.schemes {
        let mut v = format!(
            "{} ({}{})",
            yes(s.supported),
            s.mechanism,
            if s.listed { "" } else { ", not listed" }
        );
        if let Some(e) = &s.error {
            v.push_str(&format!(": {e}"));
        }
        rows.push((s.scheme, v));
    }
    rows.push((
        "GCM IVs",
        match tok.gcm_iv {
            IvFinding::Caller => "from the caller (kesh draws them from the token's RNG)".into(),
            IvFinding::Device => "generated by the device".into(),
            IvFinding::Unknown => "unknown (GCM does not work)".into(),
        },
    ));
    rows.push((
        "Sessions",
        format!(
            "{} open of {} (read-write: {} of {})",
            tok.sessions.map_or("?".into(), |n| n.to_string()),
            tok.max_sessions,
            tok.rw_sessions.map_or("?".into(), |n| n.to_string()),
            tok.max_rw_sessions
        ),
    ));
    fields(&rows)?;
    output::line("\nRecommended configuration:\n")?;
    for l in tok.recommended_config.lines() {
        output::line(l)?;
    }
    Ok(())
}
