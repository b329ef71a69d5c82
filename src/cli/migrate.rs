//! `kesh migrate --from <kes-config.yaml> --to <kesh-config.yaml>`: the command around
//! [`kesh::migrate`].

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use kesh::config::keystore::KeystoreConfig;
use kesh::migrate::{Existing, Options, Outcome};

use super::output::{self, Table};
use super::Fatal;

#[derive(clap::Args, Debug)]
#[command(
    long_about = "Copy every key of a KES `fs` or `vault` (HashiCorp Vault, OpenBao) keystore \
        into kesh's keystore.\n\n\
        Keys read from Vault stay in memory: nothing with key material is written to disk on \
        the way. Vault is logged into as the KES config says (`approle:` or `kubernetes:`); a \
        config with neither uses the token in VAULT_TOKEN.\n\n\
        Each key is imported with the `kes` scheme, its own HMAC key and its creation time and \
        creator, so every ciphertext KES produced still decrypts. Keys are checked after the \
        import by decrypting a KES-format ciphertext through the keystore. A key that fails is \
        reported and the others still migrate; the exit status is non-zero if any failed."
)]
pub(super) struct MigrateArgs {
    /// The KES server config; its `keystore:` section (`fs:` or `vault:`) says where the keys
    /// are.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// The kesh config; its `keystore:` section names the target keystore.
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// Keep keys that already exist in the target (a rerun then only adds new keys).
    #[arg(long, conflicts_with = "force")]
    pub merge: bool,
    /// Replace keys that already exist in the target (delete, then import).
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Read and check every key and report what a run would do; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(args: MigrateArgs) -> Result<(), Fatal> {
    // The source first: a Vault login that fails should not wait for the HSM.
    let mut source = kesh::migrate::kes_source(&args.from).await?;
    let mut section = kesh::migrate::keystore_section(&args.to).map_err(|e| {
        Fatal(format!(
            "{e}; --to takes a kesh config with `keystore: pkcs11:` or `soft:`"
        ))
    })?;
    let cfg = KeystoreConfig::from_value(&section);
    kesh::config::env::wipe(&mut section);
    let cfg = cfg.map_err(|e| Fatal(format!("{}: {e}", args.to.display())))?;
    let store = cfg
        .open()
        .await
        .map_err(|e| Fatal(format!("cannot open the target keystore: {e}")))?;
    let existing = if args.merge {
        Existing::Skip
    } else if args.force {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    let options = Options {
        existing,
        dry_run: args.dry_run,
    };
    // Large key sets take a while over the network: show progress to a person watching.
    let mut stderr = std::io::stderr();
    let show = stderr.is_terminal();
    let mut progress = |done: usize, total: usize| {
        if show && total >= 50 && (done.is_multiple_of(25) || done == total) {
            let _ = write!(stderr, "\rmigrating: {done}/{total} keys");
            if done == total {
                let _ = writeln!(stderr);
            }
            let _ = stderr.flush();
        }
    };
    let report =
        kesh::migrate::migrate(source.as_mut(), store.as_ref(), options, &mut progress).await?;
    let (would, verb) = if report.dry_run {
        ("would be ", "would import")
    } else {
        ("", "imported")
    };
    if args.json {
        output::json(&report)?;
    } else {
        let mut t = Table::new(&["Key", "Result"]);
        for k in &report.keys {
            t.row(vec![
                k.name.clone(),
                match &k.outcome {
                    Outcome::Imported { replaced: false } => verb.into(),
                    Outcome::Imported { replaced: true } if report.dry_run => {
                        "would replace".into()
                    }
                    Outcome::Imported { replaced: true } => "replaced".into(),
                    Outcome::Skipped { reason } => format!("skipped: {reason}"),
                    Outcome::Failed { error } => format!("FAILED: {error}"),
                },
            ]);
        }
        t.print()?;
        output::line(&format!(
            "\n{} {would}imported, {} skipped, {} failed (from {} to {}){}",
            report.imported,
            report.skipped,
            report.failed,
            source.description(),
            store.description(),
            if report.dry_run {
                "; dry run, nothing changed"
            } else {
                ""
            }
        ))?;
    }
    if report.keys.is_empty() {
        eprintln!(
            "kesh migrate: no keys found at {}: check the keystore section of {}",
            source.description(),
            args.from.display()
        );
    }
    if report.failed > 0 && report.dry_run {
        return Err(Fatal(format!(
            "{} of {} keys would fail to migrate; see above",
            report.failed,
            report.keys.len()
        )));
    }
    if report.failed > 0 {
        return Err(Fatal(format!(
            "{} of {} keys failed to migrate; see above. Fix them and rerun with --merge",
            report.failed,
            report.keys.len()
        )));
    }
    Ok(())
}
