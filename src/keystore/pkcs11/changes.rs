//! The token's change marker: how kesh instances sharing a token learn that another one
//! created or deleted a key without scanning the token.
//!
//! Every create and delete ends by replacing the marker: a `CKO_DATA` token object labelled
//! with the label prefix alone (no key name is empty, so no key's label equals it) whose value
//! is 16 fresh random bytes. Each instance reads the markers every [`POLL`] and rescans the
//! token when they changed (`Inner::watch` in `index.rs`). Two writers at once may leave two
//! markers; the next write removes both, and a reader only compares sets of values, so no
//! change goes unseen.
//!
//! A poll reads the markers it last found by their handles ([`Known`]): a writer replaces
//! markers, never changes one, so a marker that is gone means a change, and the search that
//! follows finds the new one. It searches anyway every [`SEARCH_EVERY`] polls, for the one
//! case the handles miss: two writers on different hosts at once, one adding its marker after
//! this instance's search, beside the other's. A search costs more than its three calls:
//! SoftHSM's `C_FindObjectsInit` opens the file of every object on the token (20,000 files
//! with 10,000 keys), four times a second on every instance.
//!
//! Owns the marker objects and their cryptoki calls; knows nothing of keys or the index.

use std::time::Duration;

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::error::Pkcs11Error;

/// How often each instance reads the marker.
pub const POLL: Duration = Duration::from_millis(250);
/// A poll searches for the markers at least this often (module doc); others read them by
/// handle. With [`POLL`], every 2 s.
pub const SEARCH_EVERY: u32 = 8;
/// How often an instance rescans the token even when the marker says nothing changed: a
/// create or delete that stopped before replacing the marker (a crash) shows up this late.
pub const FULL_RESCAN: Duration = Duration::from_secs(60);

/// The marker values found on the token, sorted: equal stamps mean no create or delete
/// finished in between.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp(Vec<Vec<u8>>);

fn find(s: &Session, prefix: &str) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
    Ok(s.find_objects(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(prefix.as_bytes().to_vec()),
    ])?)
}

/// One marker's value.
fn value(s: &Session, h: ObjectHandle) -> Result<Option<Vec<u8>>, Pkcs11Error> {
    let attrs = s.get_attributes(h, &[AttributeType::Value])?;
    Ok(attrs.into_iter().find_map(|a| match a {
        Attribute::Value(v) => Some(v),
        _ => None,
    }))
}

fn values(s: &Session, handles: &[ObjectHandle]) -> Result<Stamp, Pkcs11Error> {
    let mut values = Vec::with_capacity(handles.len());
    for &h in handles {
        match value(s, h) {
            Ok(v) => values.extend(v),
            // Replaced by another writer between the search and the read.
            Err(e) if e.is_stale() => {}
            Err(e) => return Err(e),
        }
    }
    values.sort();
    Ok(Stamp(values))
}

/// The markers as they are now.
pub fn read(s: &Session, prefix: &str) -> Result<Stamp, Pkcs11Error> {
    values(s, &find(s, prefix)?)
}

/// The markers a poll last found, to read by handle.
#[derive(Debug)]
pub struct Known {
    handles: Vec<ObjectHandle>,
    stamp: Stamp,
    /// The device generation the handles belong to.
    generation: u64,
    reads: u32,
}

/// The markers as they are now, read by the handles in `known` while they all still read as
/// they did; searched for (and `known` replaced) otherwise, every [`SEARCH_EVERY`] polls, on
/// a device of another generation, and while there is no marker to read.
pub fn read_known(
    s: &Session,
    prefix: &str,
    known: &mut Option<Known>,
    generation: u64,
) -> Result<Stamp, Pkcs11Error> {
    // No marker yet (a token no instance has written): only a search sees the first one.
    if let Some(k) = known.as_mut().filter(|k| {
        k.generation == generation && k.reads + 1 < SEARCH_EVERY && !k.handles.is_empty()
    }) {
        if unchanged(s, k) {
            k.reads += 1;
            return Ok(k.stamp.clone());
        }
    }
    let handles = find(s, prefix)?;
    let stamp = values(s, &handles)?;
    *known = Some(Known {
        handles,
        stamp: stamp.clone(),
        generation,
        reads: 0,
    });
    Ok(stamp)
}

/// Whether every known marker still reads its value. Any failure (gone, or a handle number
/// now naming another object) counts as a change: the search after it says what is there.
fn unchanged(s: &Session, k: &Known) -> bool {
    let mut now = Vec::with_capacity(k.handles.len());
    for &h in &k.handles {
        match value(s, h) {
            Ok(v) => now.extend(v),
            Err(_) => return false,
        }
    }
    now.sort();
    Stamp(now) == k.stamp
}

/// Replaces the markers with a fresh one. Returns the stamp before and after: when `before`
/// is what this instance last saw, nobody else changed the token in between, and `after` is
/// what the instance has now seen.
pub fn touch(s: &Session, prefix: &str) -> Result<(Stamp, Stamp), Pkcs11Error> {
    let old = find(s, prefix)?;
    let before = values(s, &old)?;
    let mut value = [0u8; 16];
    s.generate_random_slice(&mut value)?;
    // The new marker first: the token always has one, and readers never see an empty set
    // that could equal an earlier empty one.
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(prefix.as_bytes().to_vec()),
        Attribute::Application(b"kesh change marker".to_vec()),
        Attribute::Value(value.to_vec()),
    ])?;
    for h in old {
        // Another writer may have removed it already.
        let _ = s.destroy_object(h);
    }
    Ok((before, read(s, prefix)?))
}
