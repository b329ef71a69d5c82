//! The soft keystore's key directory: shared by several `kesh server` processes, and the file
//! hygiene it enforces (docs/SECURITY.md, "The soft keystore's directory").

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::harness::http::status_of;
use crate::harness::server;

/// A key directory and a KEK file (mode 0600) in a fresh temporary directory.
struct KeyDir {
    root: tempfile::TempDir,
}

impl KeyDir {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let kek = root.path().join("kek");
        crate::harness::write_private(&kek, hex::encode([7u8; 32]));
        KeyDir { root }
    }

    fn keys(&self) -> PathBuf {
        self.root.path().join("keys")
    }

    fn kek(&self) -> PathBuf {
        self.root.path().join("kek")
    }

    /// Opens the directory in this process.
    fn open(&self) -> Result<kesh::keystore::soft::SoftKeyStore, kesh::keystore::KeystoreError> {
        kesh::keystore::soft::SoftKeyStore::open_dir(&self.keys(), &self.kek())
    }

    /// Why opening the directory fails.
    fn open_error(&self) -> String {
        self.open().unwrap_err().to_string()
    }

    fn keystore(&self) -> String {
        crate::harness::soft_keystore_section(&self.keys(), &self.kek())
    }
}

/// A key deleted through one process stops working in the other at once, and a name created
/// again is served with the new key everywhere: a DEK sealed by either process opens in both.
/// Before, the second process kept sealing under the deleted key from its cache, and nothing
/// could open those DEKs after the re-create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_directory_agree_on_deletes_and_recreates() {
    let dir = KeyDir::new();
    let a = server().keystore_yaml(&dir.keystore()).spawn();
    let b = server().keystore_yaml(&dir.keystore()).spawn();
    let (ca, cb) = (a.client(), b.client());
    for round in 0..3 {
        let k = format!("shared-{round}");
        ca.create_key(&k).await.unwrap();
        let old = cb.generate_key(&k, b"ctx").await.unwrap();
        ca.delete_key(&k).await.unwrap();
        assert_eq!(
            status_of(cb.generate_key(&k, b"ctx").await.unwrap_err()),
            (404, "key does not exist".into()),
            "round {round}: B sealed under a deleted key"
        );
        assert!(!cb.list_keys("*").await.unwrap().contains(&k));
        ca.create_key(&k).await.unwrap();
        let new = cb.generate_key(&k, b"ctx").await.unwrap();
        for c in [&ca, &cb] {
            let opened = c.decrypt(&k, &new.ciphertext.0, b"ctx").await.unwrap();
            assert_eq!(opened.0.as_slice(), new.plaintext.0.as_slice());
            assert_eq!(
                status_of(c.decrypt(&k, &old.ciphertext.0, b"ctx").await.unwrap_err()),
                (400, "decryption failed: ciphertext is not authentic".into()),
                "round {round}: the old key still opens"
            );
        }
        assert!(cb.list_keys("*").await.unwrap().contains(&k));
        // A create through B of a name A made is refused, whatever B had cached.
        assert_eq!(
            status_of(cb.create_key(&k).await.unwrap_err()),
            (400, "key already exists".into())
        );
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The directory is made 0700; a KEK file others can read is refused with the fix named.
#[test]
fn the_key_directory_is_private_and_the_kek_file_must_be() {
    let dir = KeyDir::new();
    dir.open().unwrap();
    assert_eq!(mode(&dir.keys()), 0o700);
    for open in [0o644, 0o604, 0o666] {
        std::fs::set_permissions(dir.kek(), std::fs::Permissions::from_mode(open)).unwrap();
        let e = dir.open_error();
        assert!(
            e.contains("open to other users") && e.contains("chmod 600"),
            "{e}"
        );
    }
    // Group read is the documented `root:kesh 0640` layout.
    std::fs::set_permissions(dir.kek(), std::fs::Permissions::from_mode(0o640)).unwrap();
    dir.open().unwrap();
}

/// A bad key file (unreadable, corrupt, misnamed) is skipped, logged and counted; the other
/// keys keep working and the server starts. Old temp files of an interrupted create go; a
/// young one (maybe another process's create in progress) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_files_are_skipped_and_counted_and_old_temp_files_removed() {
    let dir = KeyDir::new();
    let first = server().keystore_yaml(&dir.keystore()).spawn();
    first.client().create_key("good").await.unwrap();
    let dek = first.client().generate_key("good", b"").await.unwrap();
    drop(first);
    let keys = dir.keys();
    std::fs::write(keys.join("corrupt.key"), b"not a wrapped key").unwrap();
    std::fs::write(keys.join("bad name!.key"), b"x").unwrap();
    std::fs::copy(keys.join("good.key"), keys.join("renamed.key")).unwrap();
    let old_tmp = keys.join(".tmp-good-0123456789abcdef");
    let young_tmp = keys.join(".tmp-good-fedcba9876543210");
    std::fs::write(&old_tmp, b"half a key").unwrap();
    std::fs::write(&young_tmp, b"half a key").unwrap();
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&old_tmp)
        .unwrap()
        .set_modified(an_hour_ago)
        .unwrap();

    let srv = server().keystore_yaml(&dir.keystore()).spawn();
    let c = srv.client();
    let opened = c.decrypt("good", &dek.ciphertext.0, b"").await.unwrap();
    assert_eq!(opened.0.as_slice(), dek.plaintext.0.as_slice());
    assert!(
        !old_tmp.exists(),
        "an hour-old temp file is left from a crash"
    );
    assert!(
        young_tmp.exists(),
        "a fresh temp file may be a create in progress"
    );
    let metrics = c.kesh_metrics().await.unwrap();
    assert!(
        metrics.contains("kesh_keystore_unreadable_key_files 3\n"),
        "{metrics}"
    );
    let log = srv.stderr();
    for file in ["corrupt.key", "bad name!.key", "renamed.key"] {
        assert_eq!(
            log.matches(&format!("file={file}")).count()
                + log.matches(&format!("file=\"{file}\"")).count(),
            1,
            "{file} logged once:\n{log}"
        );
    }
    // A request for a bad file's key fails on that key alone.
    assert!(c.describe_key("corrupt").await.is_err());
    c.describe_key("good").await.unwrap();
    // Removing a bad file takes it off the count.
    std::fs::remove_file(keys.join("corrupt.key")).unwrap();
    c.list_keys("*").await.unwrap();
    let metrics = c.kesh_metrics().await.unwrap();
    assert!(
        metrics.contains("kesh_keystore_unreadable_key_files 2\n"),
        "{metrics}"
    );
}

/// A directory where no key file opens is a wrong KEK, not a directory of bad files.
#[test]
fn a_wrong_kek_refuses_to_open_the_directory() {
    let dir = KeyDir::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = dir.open().unwrap();
    let name = kesh::name::KeyName::new("k").unwrap();
    use kesh::keystore::KeyStore as _;
    rt.block_on(store.create(&name, crate::harness::who()))
        .unwrap();
    std::fs::write(dir.kek(), hex::encode([8u8; 32])).unwrap();
    let e = dir.open_error();
    assert!(
        e.contains("none of the 1 key files") && e.contains("kek_file"),
        "{e}"
    );
}
