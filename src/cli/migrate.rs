//! `kesh migrate --from <kes-config.yaml> --to <kesh-config.yaml>`: the command around
//! [`kesh::migrate`].

use std::path::PathBuf;

use kesh::config::keystore::KeystoreConfig;
use kesh::migrate::{Existing, Outcome};

use super::output::{self, Table};
use super::Fatal;

#[derive(clap::Args, Debug)]
#[command(
    long_about = "Copy every key of a KES `fs` keystore into kesh's keystore.\n\n\
        Each key is imported with the `kes` scheme, its own HMAC key and its creation time and \
        creator, so every ciphertext KES produced still decrypts. Keys are checked after the \
        import by decrypting a KES-format ciphertext through the keystore. A key that fails is \
        reported and the others still migrate; the exit status is non-zero if any failed."
)]
pub struct MigrateArgs {
    /// The KES server config; its `keystore: fs: path:` names the key directory.
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
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: MigrateArgs) -> Result<(), Fatal> {
    let dir = kesh::migrate::kes_fs_path(&args.from)?;
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
    let report = kesh::migrate::migrate_dir(&dir, store.as_ref(), existing).await?;
    if args.json {
        output::json(&report)?;
    } else {
        let mut t = Table::new(&["Key", "Result"]);
        for k in &report.keys {
            t.row(vec![
                k.name.clone(),
                match &k.outcome {
                    Outcome::Imported { replaced: false } => "imported".into(),
                    Outcome::Imported { replaced: true } => "replaced".into(),
                    Outcome::Skipped { reason } => format!("skipped: {reason}"),
                    Outcome::Failed { error } => format!("FAILED: {error}"),
                },
            ]);
        }
        t.print()?;
        output::line(&format!(
            "\n{} imported, {} skipped, {} failed (from {} to {})",
            report.imported,
            report.skipped,
            report.failed,
            dir.display(),
            store.description()
        ))?;
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
