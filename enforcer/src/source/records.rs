//! Where identity records come from: the `identity/` subfolder of the manifests folder
//! (standalone; the manifests source does not descend into subfolders), or the
//! `IdentityBinding` reflector of the kube source (see [`super::kube::run_with_records`]).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::identity::records::{IdentityBinding, RecordMetrics, Rejection, parse_file};

use super::watch::{DirWatch, Fingerprint, fingerprint};

/// The records as the kube source publishes them (`None` until their first list).
pub type RecordsRx = watch::Receiver<Option<Arc<Vec<Arc<IdentityBinding>>>>>;

/// How often the records folder is scanned when no event says it changed.
const SCAN_WITHOUT_EVENTS: Duration = Duration::from_secs(1);

/// The records an agent reads.
pub enum RecordsSource {
    Folder(RecordsFolder),
    Kube(RecordsRx),
}

impl RecordsSource {
    /// `Some` with every record when they changed since the last call (for the kube source,
    /// once their first list is in).
    pub fn poll(&mut self, metrics: &RecordMetrics) -> Option<Vec<Arc<IdentityBinding>>> {
        match self {
            Self::Folder(f) => f.poll(metrics),
            Self::Kube(rx) => {
                if !rx.has_changed().unwrap_or(false) {
                    return None;
                }
                rx.borrow_and_update().as_ref().map(|r| r.to_vec())
            }
        }
    }
}

/// One record file as last read: its records or why it has none.
struct FileState {
    fingerprint: Option<Fingerprint>,
    record: Result<Arc<IdentityBinding>, String>,
}

/// The standalone records folder, one YAML file per record, re-read when inotify says it
/// changed (or every second). Writers replace files atomically (temp file + rename), so a file
/// is complete whenever it is read; one that does not parse binds nothing and is reported once.
pub struct RecordsFolder {
    dir: PathBuf,
    watch: Option<DirWatch>,
    files: BTreeMap<PathBuf, FileState>,
    last_scan: Option<Instant>,
}

impl RecordsFolder {
    /// Watches `dir`, creating it when missing.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            log::warn!(
                "creating the identity records folder {}: {e}",
                dir.display()
            );
        }
        let watch = DirWatch::new(&dir)
            .map_err(|e| {
                log::warn!(
                    "cannot watch {} with inotify ({e}); scanning it every second",
                    dir.display()
                );
            })
            .ok();
        Self {
            dir,
            watch,
            files: BTreeMap::new(),
            last_scan: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `Some` with every good record (sorted by file) when a file changed, came or went, and on
    /// the first call.
    pub fn poll(&mut self, metrics: &RecordMetrics) -> Option<Vec<Arc<IdentityBinding>>> {
        let first = self.last_scan.is_none();
        let mut due = first
            || self.watch.is_none()
            || self
                .last_scan
                .is_some_and(|t| t.elapsed() >= SCAN_WITHOUT_EVENTS);
        if let Some(w) = &self.watch {
            match w.wait(Duration::ZERO) {
                Ok(events) => due |= !events.is_empty(),
                Err(e) => {
                    log::warn!(
                        "inotify on {}: {e}; scanning it every second",
                        self.dir.display()
                    );
                    self.watch = None;
                }
            }
        }
        if !due {
            return None;
        }
        self.last_scan = Some(Instant::now());
        let files = match record_files(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                // Keep what was read: a folder that cannot be listed for a moment does not
                // unbind every remote identity.
                log::warn!(
                    "reading the identity records folder {}: {e}",
                    self.dir.display()
                );
                return None;
            }
        };
        let mut changed = first;
        let before = self.files.len();
        self.files.retain(|f, _| files.contains(f));
        changed |= self.files.len() != before;
        for file in files {
            let fp = fingerprint(&file);
            if self.files.get(&file).is_some_and(|s| s.fingerprint == fp) {
                continue;
            }
            let record = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|t| parse_file(&t))
                .map(|mut r| {
                    r.trim();
                    Arc::new(r)
                });
            if let Err(e) = &record {
                log::warn!(
                    "identity record {}: rejected ({}): {e}",
                    file.display(),
                    Rejection::Malformed.as_str()
                );
                metrics.count_rejected(Rejection::Malformed);
            }
            let unchanged = self.files.get(&file).is_some_and(|s| s.record == record);
            changed |= !unchanged;
            self.files.insert(
                file,
                FileState {
                    fingerprint: fp,
                    record,
                },
            );
        }
        changed.then(|| {
            self.files
                .values()
                .filter_map(|s| s.record.as_ref().ok().cloned())
                .collect()
        })
    }
}

/// The `*.yaml` files of the records folder (hidden ones, such as a writer's temporary files,
/// left out), sorted.
pub fn record_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !name.starts_with('.') && name.ends_with(".yaml") && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}
