//! Where the agent's view of the cluster comes from. The standalone source watches a folder of
//! manifests; the in-cluster source (kube watchers) produces the same [`Cluster`].
//!
//! Both keep the last good version of what breaks: a file that no longer parses keeps its last
//! parsed objects, and a policy that no longer validates keeps its last valid version, so a
//! broken edit never opens or closes traffic it does not name. A policy that never validated
//! has no such version: it is passed on refused, and the compiler isolates the pods it selects
//! in the directions it names (fail closed), rather than ignoring it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use enforcer_policy::{
    model::Cluster,
    validate::{refusal, validate_policy},
};

use super::manifests::{self, FileError, Loaded};

/// One problem to report: where and what.
pub type Problem = String;

/// How often the folder is scanned when no event says it changed: the safety net for missed
/// events and for filesystems without inotify.
const SCAN_WITHOUT_EVENTS: Duration = Duration::from_secs(1);

/// A file inotify says is still open for writing is read by the hold-still rule only after its
/// content held still this long (a writer that never closes it still gets applied).
const SETTLE_OPEN_WRITER: Duration = Duration::from_secs(2);

/// How long [`ManifestsSource::preload`] waits between scans for files to hold still.
const PRELOAD_WAIT: Duration = Duration::from_millis(50);

/// What identifies one version of a file: inode, size, change and modification times.
pub(super) type Fingerprint = (u64, u64, i64, i64, i64, i64);

pub(super) fn fingerprint(path: &Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// One file as last read.
#[derive(Debug)]
struct FileState {
    fingerprint: Option<Fingerprint>,
    /// Its objects as of the last version that loaded without error.
    good: Option<Loaded>,
    /// Problems of the version read last.
    problems: Vec<Problem>,
}

/// Reads a manifests folder when it changes, keeping the last good version of each file.
///
/// Only files that changed are read and parsed again. A changed file is read once it is
/// complete: inotify saw it closed after writing or renamed into the folder (the way
/// `kubectl`-style tools and ConfigMap mounts replace files), or, failing that, it held still
/// from one scan to the next, so a file caught half-written is never applied.
#[derive(Debug)]
pub struct ManifestsSource {
    dir: PathBuf,
    watch: Option<DirWatch>,
    files: BTreeMap<PathBuf, FileState>,
    /// The good versions of `files` merged, kept up to date file by file.
    merge: manifests::Merge,
    /// Fingerprints at the previous scan and since when each was seen, for the hold-still rule.
    previous_scan: BTreeMap<PathBuf, (Option<Fingerprint>, Instant)>,
    /// Names inotify saw closed after writing or moved in, since they were last read.
    complete: BTreeSet<PathBuf>,
    /// Names inotify saw created or modified and not yet closed.
    writing: BTreeSet<PathBuf>,
    /// Scan at the next poll: an event arrived, or a change is waiting to hold still.
    rescan: bool,
    last_scan: Option<Instant>,
    read_once: bool,
    /// The first version of the folder, read by [`ManifestsSource::preload`] and not yet
    /// returned by [`ManifestsSource::poll`].
    preloaded: Option<(Cluster, Vec<Problem>)>,
}

impl ManifestsSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let watch = match DirWatch::new(&dir) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!(
                    "cannot watch {} with inotify ({e}); scanning it every second",
                    dir.display()
                );
                None
            }
        };
        Self {
            dir,
            watch,
            files: BTreeMap::new(),
            merge: manifests::Merge::default(),
            previous_scan: BTreeMap::new(),
            complete: BTreeSet::new(),
            writing: BTreeSet::new(),
            rescan: true,
            last_scan: None,
            read_once: false,
            preloaded: None,
        }
    }

    /// Reads the folder until its first complete version is in, or `stop` is set: a cold start
    /// does this while the programs load. The next [`ManifestsSource::poll`] returns it.
    pub fn preload(&mut self, stop: &std::sync::atomic::AtomicBool) {
        let started = Instant::now();
        while self.preloaded.is_none() && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match self.poll() {
                Ok(Some(read)) => self.preloaded = Some(read),
                // The control loop's poll reports it.
                Err(_) => return,
                Ok(None) => self.wait(PRELOAD_WAIT),
            }
        }
        if self.preloaded.is_some() {
            log::debug!(
                "manifests folder read ahead in {:.3} s",
                started.elapsed().as_secs_f64()
            );
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits up to `timeout` for the folder to change (returns early on an inotify event).
    pub fn wait(&mut self, timeout: Duration) {
        if self.watch.is_none() {
            std::thread::sleep(timeout);
            return;
        }
        self.take_events(timeout);
    }

    /// Takes the pending inotify events (waiting up to `timeout` for the first) into `writing`
    /// and `complete`.
    fn take_events(&mut self, timeout: Duration) {
        let Some(w) = &self.watch else { return };
        match w.wait(timeout) {
            Ok(events) => {
                for (name, kind) in events {
                    log::trace!("inotify: {name:?} {kind:?}");
                    self.rescan = true;
                    let Some(name) = name else { continue };
                    let path = self.dir.join(name);
                    match kind {
                        WatchEvent::Writing => {
                            self.complete.remove(&path);
                            self.writing.insert(path);
                        }
                        WatchEvent::Complete => {
                            self.writing.remove(&path);
                            self.complete.insert(path);
                        }
                        WatchEvent::Gone => {
                            self.writing.remove(&path);
                            self.complete.remove(&path);
                        }
                        WatchEvent::Other => {}
                    }
                }
            }
            Err(e) => {
                log::warn!(
                    "inotify on {}: {e}; scanning it every second",
                    self.dir.display()
                );
                self.watch = None;
            }
        }
    }

    /// `Some` when the folder changed since the last read (or on the first read): the cluster
    /// to enforce and the problems found. `Err` only when the folder cannot be listed.
    pub fn poll(&mut self) -> Result<Option<(Cluster, Vec<Problem>)>> {
        if let Some(read) = self.preloaded.take() {
            return Ok(Some(read));
        }
        let due = self.rescan
            || self.watch.is_none()
            || self
                .last_scan
                .is_none_or(|t| t.elapsed() >= SCAN_WITHOUT_EVENTS);
        if !due {
            return Ok(None);
        }
        self.rescan = false;
        self.last_scan = Some(Instant::now());
        let now = Instant::now();
        let mut scan: BTreeMap<PathBuf, (Option<Fingerprint>, Instant)> = BTreeMap::new();
        for f in manifest_files(&self.dir)? {
            let fp = fingerprint(&f);
            let since = match self.previous_scan.get(&f) {
                Some((old, since)) if *old == fp => *since,
                _ => now,
            };
            scan.insert(f, (fp, since));
        }
        // Events up to this moment: a write that began since the last wait is seen here.
        self.take_events(Duration::ZERO);
        let mut due: Vec<(&PathBuf, Option<Fingerprint>, bool)> = Vec::new();
        for (file, (fp, since)) in &scan {
            if self.files.get(file).is_some_and(|s| s.fingerprint == *fp) {
                continue;
            }
            let is_complete = self.complete.contains(file) && !self.writing.contains(file);
            let held_still = *since < now
                && (!self.writing.contains(file)
                    || now.duration_since(*since) >= SETTLE_OPEN_WRITER);
            if !is_complete && !held_still {
                // Look again at the next poll.
                self.rescan = true;
                continue;
            }
            log::debug!(
                "reading {} ({})",
                file.display(),
                if is_complete {
                    "closed or moved in"
                } else {
                    "held still"
                }
            );
            due.push((file, *fp, self.writing.contains(file)));
        }
        let started = Instant::now();
        let parsed = read_all(due.iter().map(|(file, _, _)| file.as_path()));
        // A write that began while we read would leave us half a file: the events and the
        // fingerprint after the read say so, and the file is read again once complete.
        self.take_events(Duration::ZERO);
        let mut changed = false;
        let count = due.len();
        for ((file, fp, was_writing), parsed) in due.into_iter().zip(parsed) {
            if (!was_writing && self.writing.contains(file)) || fingerprint(file) != fp {
                self.rescan = true;
                continue;
            }
            self.complete.remove(file);
            self.writing.remove(file);
            self.store(file, fp, parsed);
            changed = true;
        }
        if count > 0 {
            log::debug!(
                "read and parsed {count} manifest files in {:.3} s",
                started.elapsed().as_secs_f64()
            );
        }
        // Files that were deleted are deleted, not kept.
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|f| !scan.contains_key(*f))
            .cloned()
            .collect();
        for f in gone {
            if let Some(state) = self.files.remove(&f) {
                self.merge.replace(&f, state.good.as_ref(), None);
            }
            changed = true;
        }
        self.previous_scan = scan;
        if !changed && self.read_once {
            return Ok(None);
        }
        if self.rescan && !self.read_once {
            // The first read waits until every file is complete.
            return Ok(None);
        }
        self.read_once = true;
        let merging = Instant::now();
        let mut problems: Vec<Problem> = self
            .files
            .values()
            .flat_map(|state| state.problems.iter().cloned())
            .collect();
        let mut loaded = self.merge.merged(
            self.files
                .iter()
                .filter_map(|(file, state)| Some((file.as_path(), state.good.as_ref()?))),
        );
        manifests::finish(&mut loaded);
        problems.extend(loaded.errors.iter().map(FileError::to_string));
        log::debug!(
            "{} files merged in {:.3} s",
            self.files.len(),
            merging.elapsed().as_secs_f64()
        );
        Ok(Some((loaded.cluster, problems)))
    }

    /// Stores one file as parsed; a version that does not load keeps the last good one.
    fn store(&mut self, file: &Path, fingerprint: Option<Fingerprint>, parsed: Parsed) {
        let state = self.files.entry(file.to_path_buf()).or_insert(FileState {
            fingerprint: None,
            good: None,
            problems: Vec::new(),
        });
        state.fingerprint = fingerprint;
        let mut problems = match parsed {
            Ok(part) => {
                self.merge.replace(file, state.good.as_ref(), Some(&part));
                state.good = Some(part);
                Vec::new()
            }
            Err(problems) => problems,
        };
        if !problems.is_empty() {
            if state.good.is_some() {
                problems.push(format!("{}: keeping its last good version", file.display()));
            } else {
                problems.push(format!(
                    "{}: not applied (no earlier good version)",
                    file.display()
                ));
            }
        }
        // A cluster-wide policy enforced otherwise than written (refused: its fail-closed
        // stand-in) is said for as long as it is enforced so.
        if let Some(good) = &state.good {
            problems.extend(manifests::cluster_policy_problems(good, Some(file)));
        }
        state.problems = problems;
    }
}

/// One file read and parsed: its objects, or the problems that keep it from loading.
type Parsed = std::result::Result<Loaded, Vec<Problem>>;

fn read_and_parse(file: &Path) -> Parsed {
    let text = std::fs::read_to_string(file)
        .map_err(|e| vec![format!("{}: cannot read: {e}", file.display())])?;
    let mut part = Loaded::default();
    manifests::load_text(file, &text, &mut part);
    if part.errors.is_empty() {
        part.forget_seen();
        Ok(part)
    } else {
        Err(part.errors.iter().map(FileError::to_string).collect())
    }
}

/// Reads and parses files on every core (a cold start reads the whole folder), returning the
/// results in the order given.
fn read_all<'a>(files: impl ExactSizeIterator<Item = &'a Path>) -> Vec<Parsed> {
    let files: Vec<&Path> = files.collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(files.len());
    if workers <= 1 {
        return files.into_iter().map(read_and_parse).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<Parsed>> = std::iter::repeat_with(|| None).take(files.len()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(file) = files.get(i) else { break };
                        done.push((i, read_and_parse(file)));
                    }
                    done
                })
            })
            .collect();
        for h in handles {
            // A worker that panicked re-raises here, as the same parse on this thread would.
            for (i, p) in h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)) {
                out[i] = Some(p);
            }
        }
    });
    out.into_iter()
        .map(|p| p.expect("every file is parsed by one worker"))
        .collect()
}

/// What an inotify event says about one name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WatchEvent {
    /// Created or modified: being written.
    Writing,
    /// Closed after writing, or renamed into the folder.
    Complete,
    /// Deleted or renamed away.
    Gone,
    /// Anything else (attributes, queue overflow): worth a scan.
    Other,
}

/// An inotify watch on one folder.
#[derive(Debug)]
pub(super) struct DirWatch {
    fd: std::os::fd::OwnedFd,
}

impl DirWatch {
    pub(super) fn new(dir: &Path) -> std::io::Result<Self> {
        use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path =
            std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MODIFY
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        use std::os::fd::AsRawFd as _;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits up to `timeout` for events and returns them (name, what happened).
    pub(super) fn wait(
        &self,
        timeout: Duration,
    ) -> std::io::Result<Vec<(Option<std::ffi::OsString>, WatchEvent)>> {
        use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reads into a buffer of the given size.
            let len =
                unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if len <= 0 {
                let e = std::io::Error::last_os_error();
                if len == 0
                    || e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted
                {
                    return Ok(out);
                }
                return Err(e);
            }
            let len = usize::try_from(len).unwrap_or(0);
            let mut at = 0;
            // struct inotify_event { int wd; u32 mask; u32 cookie; u32 len; char name[len]; }
            while at + 16 <= len {
                let word = |i: usize| {
                    u32::from_ne_bytes([
                        buf[at + i],
                        buf[at + i + 1],
                        buf[at + i + 2],
                        buf[at + i + 3],
                    ])
                };
                let mask = word(4);
                let name_len = word(12) as usize;
                let name_end = (at + 16 + name_len).min(len);
                let raw = &buf[at + 16..name_end];
                let raw = &raw[..raw.iter().position(|b| *b == 0).unwrap_or(raw.len())];
                let name =
                    (!raw.is_empty()).then(|| std::ffi::OsStr::from_bytes(raw).to_os_string());
                let kind = if mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) != 0 {
                    WatchEvent::Complete
                } else if mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
                    WatchEvent::Gone
                } else if mask & (libc::IN_CREATE | libc::IN_MODIFY) != 0 {
                    WatchEvent::Writing
                } else {
                    WatchEvent::Other
                };
                out.push((name, kind));
                at += 16 + name_len;
            }
        }
    }
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading manifests folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
            !name.starts_with('.') && matches!(ext, "yaml" | "yml" | "json") && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Replaces every policy that does not validate by its last valid version, and remembers valid
/// ones. One that never was valid is kept as it is: the compiler refuses it, which isolates
/// the pods it selects (fail closed). Returns the problems.
#[derive(Debug, Default)]
pub struct LastGoodPolicies {
    /// namespace -> name -> (last valid version, the apply that last saw the name). Nested so
    /// that lookups borrow the names: this runs for every policy on every change.
    good: BTreeMap<String, BTreeMap<String, (std::sync::Arc<NetworkPolicy>, u64)>>,
    applies: u64,
}

impl LastGoodPolicies {
    pub fn apply(&mut self, cluster: &mut Cluster) -> Vec<Problem> {
        self.applies += 1;
        let now = self.applies;
        let mut problems = Vec::new();
        let mut out = Vec::with_capacity(cluster.policies.len());
        for p in cluster.policies.drain(..) {
            let ns = p
                .metadata
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or("default");
            let name = p.metadata.name.as_deref().unwrap_or_default();
            let known = self.good.get_mut(ns).and_then(|names| names.get_mut(name));
            if let Some((old, seen)) = known {
                *seen = now;
                if std::sync::Arc::ptr_eq(old, &p) {
                    // The very object validated before (sources share unchanged objects).
                    out.push(p);
                    continue;
                }
            }
            match validate_policy(&p) {
                Ok(()) => {
                    self.good
                        .entry(ns.to_string())
                        .or_default()
                        .insert(name.to_string(), (p.clone(), now));
                    out.push(p);
                }
                Err(errors) => {
                    problems.extend(errors.iter().map(ToString::to_string));
                    match self.good.get(ns).and_then(|names| names.get(name)) {
                        Some((old, _)) => {
                            problems.push(format!(
                                "NetworkPolicy {ns}/{name}: keeping its last valid version"
                            ));
                            out.push(old.clone());
                        }
                        None => {
                            let consequence = refusal(&p, errors).consequence();
                            problems
                                .push(format!("NetworkPolicy {ns}/{name}: refused, {consequence}"));
                            out.push(p);
                        }
                    }
                }
            }
        }
        self.good.retain(|_, names| {
            names.retain(|_, (_, seen)| *seen == now);
            !names.is_empty()
        });
        cluster.policies = out;
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n";
    const GOOD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: x\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
    const BAD_FIELD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: x\nspec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n      endPort: 70\n";

    /// Waits for the next read of the folder, the way the agent does.
    fn next(src: &mut ManifestsSource) -> (Cluster, Vec<Problem>) {
        for _ in 0..100 {
            src.wait(Duration::from_millis(50));
            if let Some(r) = src.poll().unwrap() {
                return r;
            }
        }
        panic!("the folder was not read within 5 s");
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        std::fs::write(dir.path().join("p.yaml"), GOOD).unwrap();
        let mut src = ManifestsSource::new(dir.path());
        let (c, problems) = next(&mut src);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.policies.len(), 1);
        src.wait(Duration::from_millis(50));
        assert!(src.poll().unwrap().is_none(), "unchanged folder");
        std::fs::write(dir.path().join("p.yaml"), "kind: [unclosed").unwrap();
        let (c, problems) = next(&mut src);
        assert_eq!(c.policies.len(), 1, "last good policy kept");
        assert!(
            problems.iter().any(|p| p.contains("p.yaml")),
            "{problems:?}"
        );
        std::fs::remove_file(dir.path().join("p.yaml")).unwrap();
        let (c, _) = next(&mut src);
        assert!(c.policies.is_empty(), "a deleted file is deleted");
    }

    /// A Service that stops validating leaves its file's last good objects enforced: its
    /// frontends keep being judged on their backends.
    /// A file kept for later merges holds its objects and nothing of the loader's bookkeeping
    /// (names seen, origins): per pod of a large folder that would cost more than the pod.
    #[test]
    fn a_kept_file_holds_only_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.1}\n";
        std::fs::write(
            dir.path().join("all.yaml"),
            format!("{NS}---\n{GOOD}---\n{pod}"),
        )
        .unwrap();
        let mut src = ManifestsSource::new(dir.path());
        let (c, problems) = next(&mut src);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            (c.namespaces.len(), c.policies.len(), c.pods.len()),
            (1, 1, 1)
        );
        let kept = src.files[&dir.path().join("all.yaml")]
            .good
            .as_ref()
            .unwrap();
        assert_eq!(kept.cluster.pods.len(), 1);
        assert!(kept.origins.is_empty(), "{:?}", kept.origins);
    }

    #[test]
    fn a_broken_service_keeps_its_files_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: x\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n";
        std::fs::write(dir.path().join("s.yaml"), format!("{NS}---\n{svc}")).unwrap();
        let mut src = ManifestsSource::new(dir.path());
        let (c, problems) = next(&mut src);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.services.len(), 1);
        std::fs::write(
            dir.path().join("s.yaml"),
            format!("{NS}---\n{}", svc.replace("10.96.0.10", "10.96.0.x")),
        )
        .unwrap();
        let (c, problems) = next(&mut src);
        assert_eq!(c.services.len(), 1, "the last good version stays");
        assert_eq!(
            c.services[0].spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10")
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("Service x/web: spec.clusterIP: \"10.96.0.x\"")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("keeping its last good version")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_file_is_read_when_closed_or_renamed_in_and_not_while_open() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        let mut src = ManifestsSource::new(dir.path());
        let (c, _) = next(&mut src);
        assert!(c.policies.is_empty());
        // Written in place and closed: read at the first poll after the event, no settling.
        std::fs::write(dir.path().join("p.yaml"), GOOD).unwrap();
        src.wait(Duration::from_millis(500));
        let (c, _) = src.poll().unwrap().expect("read right after the close");
        assert_eq!(c.policies.len(), 1);
        // A writer that keeps the file open: not read while open (within the settle time) ...
        let other = GOOD.replace("name: deny", "name: other");
        let mut f = std::fs::File::create(dir.path().join("q.yaml")).unwrap();
        f.write_all(other.as_bytes()).unwrap();
        f.flush().unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(600) {
            src.wait(Duration::from_millis(50));
            assert!(
                src.poll().unwrap().is_none(),
                "a file still open for writing was read"
            );
        }
        // ... and read as soon as it is closed.
        drop(f);
        let (c, _) = next(&mut src);
        assert_eq!(c.policies.len(), 2);
        // Temp file + rename, the atomic way: read at once.
        let tmp = dir.path().join(".r.yaml.tmp");
        std::fs::write(&tmp, GOOD.replace("name: deny", "name: third")).unwrap();
        std::fs::rename(&tmp, dir.path().join("r.yaml")).unwrap();
        src.wait(Duration::from_millis(500));
        let (c, _) = match src.poll().unwrap() {
            Some(r) => r,
            None => next(&mut src),
        };
        assert_eq!(c.policies.len(), 3);
    }

    #[test]
    fn duplicates_across_files_are_reported_and_the_first_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), format!("{NS}---\n{GOOD}")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), GOOD.replace("Ingress", "Egress")).unwrap();
        let mut src = ManifestsSource::new(dir.path());
        let (c, problems) = next(&mut src);
        assert_eq!(c.policies.len(), 1);
        assert_eq!(
            c.policies[0].spec.as_ref().unwrap().policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("b.yaml") && p.contains("more than once")),
            "{problems:?}"
        );
    }

    /// Files parsed side by side still merge in name order: the first file's definition wins
    /// and the later ones are named; a folder read ahead is what the first poll returns.
    #[test]
    fn a_folder_read_ahead_on_every_core_merges_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |ip: usize| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x}}\nspec: {{containers: []}}\nstatus: {{podIP: 10.0.0.{ip}}}\n"
            )
        };
        for i in 0..24 {
            std::fs::write(dir.path().join(format!("{i:02}.yaml")), pod(i + 1)).unwrap();
        }
        let mut src = ManifestsSource::new(dir.path());
        src.preload(&std::sync::atomic::AtomicBool::new(false));
        let (c, problems) = src.poll().unwrap().expect("the folder read ahead");
        assert_eq!(c.pods.len(), 1);
        assert_eq!(
            enforcer_policy::model::pod_ips(&c.pods[0]),
            ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        let named: Vec<&str> = problems
            .iter()
            .filter(|p| p.contains("more than once"))
            .map(|p| p.split(' ').next().unwrap().rsplit('/').next().unwrap())
            .collect();
        let expected: Vec<String> = (1..24).map(|i| format!("{i:02}.yaml")).collect();
        assert_eq!(named, expected, "{problems:?}");
        assert!(src.poll().unwrap().is_none(), "returned once");
    }

    #[test]
    fn an_invalid_policy_keeps_its_last_valid_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut lg = LastGoodPolicies::default();
        let load = |text: &str| {
            let mut l = Loaded::default();
            manifests::load_text(&dir.path().join("p.yaml"), text, &mut l);
            manifests::finish(&mut l);
            l.cluster
        };
        let mut c = load(GOOD);
        assert!(lg.apply(&mut c).is_empty());
        let mut c = load(BAD_FIELD);
        let problems = lg.apply(&mut c);
        assert!(
            problems.iter().any(|p| p.contains("endPort")),
            "{problems:?}"
        );
        assert_eq!(c.policies.len(), 1);
        assert!(
            c.policies[0].spec.as_ref().unwrap().ingress.is_none(),
            "the old version is enforced"
        );
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: x\nspec:\n  containers: []\nstatus:\n  phase: Running\n  podIP: 10.0.0.1\n";

    fn load(dir: &Path, text: &str) -> Cluster {
        let mut l = Loaded::default();
        manifests::load_text(
            &dir.join("p.yaml"),
            &format!("{NS}---\n{POD}---\n{text}"),
            &mut l,
        );
        manifests::finish(&mut l);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        l.cluster
    }

    /// Fail closed: a policy with no valid version is passed on, and compiles to isolation of
    /// the pods it selects in the directions it names; the problem says so.
    #[test]
    fn a_policy_that_never_validated_isolates_what_it_selects() {
        use enforcer_common::{DIR_EGRESS, DIR_INGRESS};
        use enforcer_policy::compile::{Allocations, CompileOptions, compile};
        let dir = tempfile::tempdir().unwrap();
        let mut lg = LastGoodPolicies::default();
        let mut c = load(dir.path(), BAD_FIELD);
        let problems = lg.apply(&mut c);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("x/deny") && p.contains("spec.ingress[0].ports[0].endPort")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p
                == "NetworkPolicy x/deny: refused, isolating the pods it selects (ingress) until it is fixed"),
            "{problems:?}"
        );
        assert_eq!(c.policies.len(), 1, "passed on, refused");
        let compiled = compile(&c, &CompileOptions::default(), &mut Allocations::new());
        assert_eq!(compiled.refused.len(), 1);
        let ep = &compiled.state.endpoints[&enforcer_policy::state::PodRef::new("x", "a")];
        assert!(ep.info.isolated(DIR_INGRESS) && !ep.info.isolated(DIR_EGRESS));
        assert!(compiled.state.policy.is_empty(), "nothing allowed");

        // Fixed: it takes effect and becomes the last good version; a bad edit then keeps it.
        let mut c = load(dir.path(), GOOD);
        assert!(lg.apply(&mut c).is_empty());
        let compiled = compile(&c, &CompileOptions::default(), &mut Allocations::new());
        assert!(compiled.refused.is_empty());
        let mut c = load(dir.path(), BAD_FIELD);
        let problems = lg.apply(&mut c);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("keeping its last valid version")),
            "{problems:?}"
        );
        assert!(c.policies[0].spec.as_ref().unwrap().ingress.is_none());
        // Deleted, then back broken: no last good version any more, refused again.
        let mut c = load(dir.path(), "");
        assert!(lg.apply(&mut c).is_empty());
        let mut c = load(dir.path(), BAD_FIELD);
        let problems = lg.apply(&mut c);
        assert!(
            problems.iter().any(|p| p.contains("refused")),
            "{problems:?}"
        );
    }
}
