//! `gmdctl compare`: online verify. The primary reads every region of its
//! copy, computes a CRC-32 per region, asks the peer for the CRC-32 of the
//! same regions of its copy ([`PeerRequest::Checksums`] on the control
//! stream) and compares them, at a bounded rate, while the application
//! runs.
//!
//! A region is compared only when it is settled on the primary both before
//! its data was read and after the peer answered (clean or hot, no write in
//! flight: [`gmd_core::engine::Engine::region_settled`]) and settled on the
//! peer (not marked there). A region found different is re-checked after a
//! pause until two looks in a row agree on both sides' checksums: a write
//! that landed on one side between the two reads shows up as a change and
//! is not reported. With `repair`, the regions found different are marked
//! stale and resynchronised from the primary at once
//! ([`gmd_core::engine::Engine::resend_regions`]).

use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gmd_core::buf::IoBuf;
use gmd_core::link::PairRole;
use gmd_core::runtime::Port;
use gmd_core::statemap::cells::{CELL_INCONSISTENT, CELL_RESYNC, CELL_STALE};
use gmd_core::units::{REGION_SIZE_BYTES, region_bytes, region_count};
use gmdctl::protocol::{
    COMPARE_RATE_DEFAULT_MIB_S, COMPARE_RATE_MAX_MIB_S, CompareReport, CompareState, ControlError,
    Event, RegionRange, STATUS_SCHEMA,
};
use tracing::{info, warn};

use super::Daemon;
use super::peers::{PeerReply, PeerRequest};

/// Most regions one checksum request may name (2 MiB of data).
pub(crate) const CHECKSUM_REGIONS_MAX: usize = 64;
/// How long the peer may take to answer one checksum request.
const CHECKSUM_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause before a region found different is looked at again.
const RECHECK_PAUSE: Duration = Duration::from_millis(200);
/// Looks at a differing region before it counts as busy (skipped).
const RECHECKS_MAX: usize = 5;

/// Checks a checksum request from the peer: at most
/// [`CHECKSUM_REGIONS_MAX`] regions, each on the device.
pub(crate) fn check_request(regions: &[u64], size_bytes: u64) -> Result<(), String> {
    if regions.is_empty() || regions.len() > CHECKSUM_REGIONS_MAX {
        return Err(format!(
            "a checksum request names {} regions (1 to {CHECKSUM_REGIONS_MAX})",
            regions.len()
        ));
    }
    let count = region_count(size_bytes);
    if let Some(r) = regions.iter().find(|&&r| r >= count) {
        return Err(format!(
            "a checksum request names region {r}, the device has {count}"
        ));
    }
    Ok(())
}

/// Checks the peer's answer to a checksum request for `asked` regions.
pub(crate) fn check_reply(asked: usize, reply: PeerReply) -> Result<Vec<Option<u32>>, String> {
    match reply {
        PeerReply::Checksums { sums } if sums.len() == asked => Ok(sums),
        PeerReply::Checksums { sums } => Err(format!(
            "the peer answered {} checksums for {asked} regions",
            sums.len()
        )),
        PeerReply::Refused { reason, .. } => Err(reason),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// CRC-32 of each of `regions` (sorted or not) of the data volume at
/// `path`, read with `O_DIRECT` (consecutive regions in one read).
pub(crate) fn checksums(path: &Path, size_bytes: u64, regions: &[u64]) -> io::Result<Vec<u32>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut out = Vec::with_capacity(regions.len());
    let mut i = 0;
    while i < regions.len() {
        let mut j = i + 1;
        while j < regions.len() && regions[j] == regions[j - 1] + 1 {
            j += 1;
        }
        let start = region_bytes(regions[i], size_bytes).start;
        let end = region_bytes(regions[j - 1], size_bytes).end;
        // O_DIRECT: whole 4 KiB blocks; the tail past the device is ignored.
        let len = (end - start).div_ceil(4096) * 4096;
        let mut buf = IoBuf::new(len as usize);
        let mut done = 0usize;
        while done < len as usize {
            let n = file.read_at(&mut buf[done..], start + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        if (done as u64) < end - start {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} ends before the device does", path.display()),
            ));
        }
        for &r in &regions[i..j] {
            let b = region_bytes(r, size_bytes);
            out.push(crc32fast::hash(
                &buf[(b.start - start) as usize..(b.end - start) as usize],
            ));
        }
        i = j;
    }
    Ok(out)
}

/// Which of `regions` are settled in the running device.
fn settled(port: &Port, regions: &[u64]) -> Vec<bool> {
    port.inspect(|e| regions.iter().map(|&r| e.region_settled(r)).collect())
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a compare job needs, found when it starts.
struct Job {
    device: String,
    peer: String,
    session: u64,
    port: Port,
    data: PathBuf,
    size_bytes: u64,
    repair: bool,
    rate_bytes_s: u64,
    started: Instant,
}

impl Daemon {
    /// `gmdctl compare`: checks that the device can be compared and starts
    /// the job; returns its first report.
    pub(super) fn compare_start(
        self: &Arc<Self>,
        device: &str,
        repair: bool,
        rate_mib_s: Option<u64>,
    ) -> Result<CompareReport, ControlError> {
        let rate = rate_mib_s.unwrap_or(COMPARE_RATE_DEFAULT_MIB_S);
        if rate == 0 || rate > COMPARE_RATE_MAX_MIB_S {
            return Err(ControlError::invalid(format!(
                "--rate must be 1 to {COMPARE_RATE_MAX_MIB_S} MiB/s"
            )));
        }
        let (data, size_bytes, role) = {
            let devices = self.devices.lock().expect("devices lock");
            let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
            (
                handle.local().data.clone(),
                handle.config().size_bytes,
                handle.role(),
            )
        };
        let link = self.link(device).ok_or_else(|| self.unknown(device))?;
        let (port, peer, session) = {
            let inner = link.inner.lock().expect("link lock");
            let Some(port) = inner.port.clone() else {
                return Err(ControlError::refused(format!(
                    "compare needs a connected pair; {device} is not AVAILABLE on {} (gmdctl start {device})",
                    self.machine
                )));
            };
            if role != PairRole::Primary {
                return Err(ControlError::refused(format!(
                    "compare runs on the primary; {device} is {} on {}{}",
                    role_name(role),
                    self.machine,
                    inner
                        .core
                        .peer()
                        .map(|p| format!(": run it on {p}"))
                        .unwrap_or_default()
                )));
            }
            let Some((peer, session)) = inner.core.connected() else {
                return Err(ControlError::refused(format!(
                    "compare needs a connected pair; {device} is not mirroring (gmdctl status {device} says why)"
                )));
            };
            (port, peer.to_owned(), session)
        };
        let stats = port.stats().snapshot().engine;
        let left = stats.resync_remaining + stats.resync_target_remaining;
        if left > 0 {
            return Err(ControlError::refused(format!(
                "compare needs a pair in sync; {device} is resynchronising ({left} region(s) left): run it once gmdctl status shows the resync finished"
            )));
        }
        let job = Job {
            device: device.to_owned(),
            peer: peer.clone(),
            session,
            port,
            data,
            size_bytes,
            repair,
            rate_bytes_s: rate << 20,
            started: Instant::now(),
        };
        let report = CompareReport {
            schema: STATUS_SCHEMA,
            device: device.to_owned(),
            peer,
            state: CompareState::Running,
            repair,
            rate_mib_s: rate,
            started_unix_s: now_unix_s(),
            elapsed_s: 0.0,
            regions_total: region_count(size_bytes),
            regions_done: 0,
            regions_compared: 0,
            regions_skipped: 0,
            percent: 0.0,
            eta_s: None,
            differing: 0,
            ranges: vec![],
            repaired: 0,
            out_of_sync_regions: 0,
            error: None,
        };
        {
            let mut compares = self.compares.lock().expect("compares lock");
            if let Some(running) = compares
                .get(device)
                .filter(|r| r.state == CompareState::Running)
            {
                return Err(ControlError::refused(format!(
                    "a compare of {device} is running ({:.0}% done): gmdctl status {device} shows it",
                    running.percent
                )));
            }
            compares.insert(device.to_owned(), report.clone());
        }
        info!(%device, peer = %job.peer, repair, rate_mib_s = rate, "online compare started");
        self.publish(Event::now(
            "change",
            "compare",
            device,
            &[
                ("phase", "start".into()),
                ("peer", job.peer.clone()),
                ("repair", if repair { "yes" } else { "no" }.into()),
                ("regions_total", report.regions_total.to_string()),
            ],
        ));
        self.watch.changed.notify_one();
        let d = self.clone();
        self.rt.spawn(async move {
            let device = job.device.clone();
            let result = d.run_compare(&job).await;
            d.update_compare(&device, |r| {
                r.elapsed_s = job.started.elapsed().as_secs_f64();
                r.eta_s = None;
                match &result {
                    Ok(()) => {
                        r.state = CompareState::Done;
                        r.percent = 100.0;
                    }
                    Err(e) => {
                        r.state = CompareState::Failed;
                        r.error = Some(e.clone());
                    }
                }
            });
            let r = d.compare_report(&device);
            if let Some(r) = &r {
                d.publish(Event::now(
                    "change",
                    "compare",
                    &device,
                    &[
                        ("phase", "end".into()),
                        ("peer", r.peer.clone()),
                        ("repair", if r.repair { "yes" } else { "no" }.into()),
                        ("regions_total", r.regions_total.to_string()),
                        ("state", if r.state == CompareState::Done { "done" } else { "failed" }.into()),
                        ("differing", r.differing.to_string()),
                        ("repaired", r.repaired.to_string()),
                    ],
                ));
            }
            match result {
                Ok(()) => {
                    let (differing, repaired) = r.map_or((0, 0), |r| (r.differing, r.repaired));
                    if differing > 0 {
                        warn!(%device, differing, repaired, "online compare finished: regions differ from the peer");
                    } else {
                        info!(%device, "online compare finished: no differences");
                    }
                }
                Err(e) => warn!(%device, "online compare stopped: {e}"),
            }
            d.watch.changed.notify_one();
        });
        Ok(report)
    }

    /// The running or last compare of `device`, brought up to date.
    pub(super) fn compare_report(&self, device: &str) -> Option<CompareReport> {
        self.compares
            .lock()
            .expect("compares lock")
            .get(device)
            .cloned()
    }

    fn update_compare(&self, device: &str, change: impl FnOnce(&mut CompareReport)) {
        if let Some(r) = self.compares.lock().expect("compares lock").get_mut(device) {
            change(r);
        }
    }

    /// The session of the job still in force, or why not.
    fn still_connected(&self, job: &Job) -> Result<(), String> {
        let link = self.link(&job.device).ok_or("the device is gone")?;
        let inner = link.inner.lock().expect("link lock");
        if inner.core.connected() != Some((job.peer.as_str(), job.session)) {
            return Err(format!(
                "the link to {} ended during the compare; run it again once the pair is connected and in sync",
                job.peer
            ));
        }
        if inner.core.role() != PairRole::Primary {
            return Err("this side stopped being primary during the compare".into());
        }
        Ok(())
    }

    /// One look at `regions`: this side's and the peer's checksum of each,
    /// or `None` where a side is not settled.
    async fn compare_look(
        &self,
        job: &Job,
        regions: &[u64],
    ) -> Result<Vec<Option<(u32, u32)>>, String> {
        self.still_connected(job)?;
        let before = settled(&job.port, regions);
        let (path, size, list) = (job.data.clone(), job.size_bytes, regions.to_vec());
        let local = tokio::task::spawn_blocking(move || checksums(&path, size, &list))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading {}: {e}", job.data.display()))?;
        let request = PeerRequest::Checksums {
            device: job.device.clone(),
            session: job.session,
            regions: regions.to_vec(),
        };
        let reply = self
            .ask(&job.peer, &request, CHECKSUM_TIMEOUT)
            .await
            .map_err(|e| format!("{}: {e}", job.peer))?;
        let remote = check_reply(regions.len(), reply).map_err(|e| format!("{}: {e}", job.peer))?;
        let after = settled(&job.port, regions);
        Ok((0..regions.len())
            .map(|i| match remote[i] {
                Some(theirs) if before[i] && after[i] => Some((local[i], theirs)),
                _ => None,
            })
            .collect())
    }

    async fn run_compare(&self, job: &Job) -> Result<(), String> {
        let total = region_count(job.size_bytes);
        let mut suspects: Vec<(u64, (u32, u32))> = Vec::new();
        let mut bytes = 0u64;
        let mut next = 0u64;
        while next < total {
            let end = (next + CHECKSUM_REGIONS_MAX as u64).min(total);
            let regions: Vec<u64> = (next..end).collect();
            let looks = self.compare_look(job, &regions).await?;
            let mut compared = 0;
            for (r, look) in regions.iter().zip(&looks) {
                if let Some((ours, theirs)) = *look {
                    compared += 1;
                    if ours != theirs {
                        suspects.push((*r, (ours, theirs)));
                    }
                }
            }
            bytes += (end - next) * REGION_SIZE_BYTES;
            let done = end;
            let elapsed = job.started.elapsed().as_secs_f64();
            self.update_compare(&job.device, |r| {
                r.regions_done = done;
                r.regions_compared += compared;
                r.regions_skipped += (end - next) - compared;
                r.elapsed_s = elapsed;
                r.percent = done as f64 * 100.0 / total.max(1) as f64;
                r.eta_s = (elapsed > 0.0)
                    .then(|| ((total - done) as f64 * elapsed / done as f64).ceil() as u64);
            });
            // The rate: no faster than rate_bytes_s on average.
            let due = Duration::from_secs_f64(bytes as f64 / job.rate_bytes_s as f64);
            if let Some(wait) = due.checked_sub(job.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            next = end;
        }
        // Re-check each suspect until two looks in a row agree.
        let mut differing = Vec::new();
        let mut busy = 0u64;
        for chunk in suspects.chunks(CHECKSUM_REGIONS_MAX) {
            let regions: Vec<u64> = chunk.iter().map(|(r, _)| *r).collect();
            let mut last: Vec<Option<(u32, u32)>> = chunk.iter().map(|(_, s)| Some(*s)).collect();
            let mut open: Vec<bool> = vec![true; chunk.len()];
            for _ in 0..RECHECKS_MAX {
                if !open.iter().any(|o| *o) {
                    break;
                }
                tokio::time::sleep(RECHECK_PAUSE).await;
                let looks = self.compare_look(job, &regions).await?;
                for i in 0..regions.len() {
                    if !open[i] {
                        continue;
                    }
                    match looks[i] {
                        None => {}
                        Some((ours, theirs)) if ours == theirs => open[i] = false,
                        Some(now) if last[i] == Some(now) => {
                            differing.push(regions[i]);
                            open[i] = false;
                        }
                        now => last[i] = now,
                    }
                }
            }
            busy += open.iter().filter(|o| **o).count() as u64;
        }
        info!(
            device = %job.device,
            suspects = suspects.len(),
            differing = differing.len(),
            busy,
            "online compare: regions that differed at first look re-checked"
        );
        differing.sort_unstable();
        let ranges = RegionRange::runs(&differing, job.size_bytes);
        let count = differing.len() as u64;
        self.update_compare(&job.device, |r| {
            r.differing = count;
            r.ranges = ranges.clone();
            r.regions_compared -= busy;
            r.regions_skipped += busy;
            r.out_of_sync_regions = count;
        });
        if count > 0 {
            warn!(device = %job.device, peer = %job.peer, regions = count,
                "online compare: {count} region(s) differ from the peer: {}",
                ranges.iter().map(|r| format!("{}+{}", r.first_region, r.regions)).collect::<Vec<_>>().join(" "));
        }
        if job.repair && count > 0 {
            self.repair(job, &differing).await?;
        }
        Ok(())
    }

    /// Marks `regions` stale and waits until the resync sent them.
    async fn repair(&self, job: &Job, regions: &[u64]) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let list = regions.to_vec();
        job.port.change(
            move |engine, _| engine.resend_regions(&list),
            move |r| {
                let _ = tx.send(r);
            },
        );
        rx.await
            .map_err(|_| "the device stopped".to_string())?
            .map_err(|e| format!("marking the differing regions stale: {e}"))?;
        info!(device = %job.device, peer = %job.peer, regions = regions.len(), "online compare: resending the differing regions");
        loop {
            self.still_connected(job)?;
            let left = job.port.inspect(|e| {
                regions
                    .iter()
                    .filter(|&&r| {
                        matches!(e.map().get(r), CELL_STALE | CELL_INCONSISTENT | CELL_RESYNC)
                    })
                    .count() as u64
            });
            let repaired = regions.len() as u64 - left;
            self.update_compare(&job.device, |r| {
                r.repaired = repaired;
                r.out_of_sync_regions = left;
                r.elapsed_s = job.started.elapsed().as_secs_f64();
            });
            if left == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Answers the peer's [`PeerRequest::Checksums`].
    pub(super) async fn on_checksums(
        self: Arc<Self>,
        from: &str,
        device: &str,
        session: u64,
        regions: Vec<u64>,
    ) -> PeerReply {
        let refused = PeerReply::refused;
        let (data, size_bytes) = {
            let devices = self.devices.lock().expect("devices lock");
            let Some(handle) = devices.get(device) else {
                return refused(format!("device {device} has no copy on {}", self.machine));
            };
            (handle.local().data.clone(), handle.config().size_bytes)
        };
        if let Err(e) = check_request(&regions, size_bytes) {
            return refused(e);
        }
        let Some(link) = self.link(device) else {
            return refused(format!("device {device} has no copy on {}", self.machine));
        };
        let port = {
            let inner = link.inner.lock().expect("link lock");
            if inner.core.connected() != Some((from, session)) {
                return refused(format!(
                    "{device} on {} is not mirroring with {from} in that session",
                    self.machine
                ));
            }
            match inner.port.clone() {
                Some(p) => p,
                None => return refused(format!("{device} is not AVAILABLE on {}", self.machine)),
            }
        };
        let before = settled(&port, &regions);
        let list = regions.clone();
        let sums =
            match tokio::task::spawn_blocking(move || checksums(&data, size_bytes, &list)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return refused(format!("{device} on {}: {e}", self.machine)),
                Err(e) => return refused(e.to_string()),
            };
        let after = settled(&port, &regions);
        PeerReply::Checksums {
            sums: (0..regions.len())
                .map(|i| (before[i] && after[i]).then_some(sums[i]))
                .collect(),
        }
    }
}

fn role_name(role: PairRole) -> &'static str {
    match role {
        PairRole::Primary => "primary",
        PairRole::Secondary => "secondary",
        PairRole::Split => "split",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 100 * REGION_SIZE_BYTES + 4096;

    #[test]
    fn a_checksum_request_must_name_a_bounded_list_of_regions_of_the_device() {
        assert!(check_request(&[0, 1, 100], SIZE).is_ok());
        assert!(check_request(&[], SIZE).is_err());
        assert!(check_request(&[101], SIZE).is_err());
        assert!(check_request(&[u64::MAX], SIZE).is_err());
        let many: Vec<u64> = (0..CHECKSUM_REGIONS_MAX as u64 + 1).collect();
        assert!(check_request(&many, SIZE).is_err());
        assert!(check_request(&many[..CHECKSUM_REGIONS_MAX], SIZE).is_ok());
    }

    #[test]
    fn a_checksum_reply_must_answer_every_region_asked() {
        let ok = PeerReply::Checksums {
            sums: vec![Some(1), None],
        };
        assert_eq!(check_reply(2, ok).unwrap(), vec![Some(1), None]);
        let short = PeerReply::Checksums {
            sums: vec![Some(1)],
        };
        assert!(check_reply(2, short).is_err());
        assert!(check_reply(1, PeerReply::Ok).is_err());
        let refused = PeerReply::refused("no".into());
        assert_eq!(check_reply(1, refused).unwrap_err(), "no");
    }

    #[test]
    fn malformed_checksum_messages_do_not_decode() {
        for text in [
            r#"{"op":"checksums","device":"d","session":1,"regions":[-1]}"#,
            r#"{"op":"checksums","device":"d","session":1,"regions":"x"}"#,
            r#"{"op":"checksums","device":"d","regions":[1]}"#,
            r#"{"op":"checksums","device":"d","session":1,"regions":[1.5]}"#,
        ] {
            assert!(serde_json::from_str::<PeerRequest>(text).is_err(), "{text}");
        }
        for text in [
            r#"{"reply":"checksums","sums":[4294967296]}"#,
            r#"{"reply":"checksums","sums":["a"]}"#,
            r#"{"reply":"checksums"}"#,
        ] {
            assert!(serde_json::from_str::<PeerReply>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn checksums_are_per_region_and_the_last_region_may_be_short() {
        let dir = std::env::temp_dir().join(format!("gmd-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        let mut data = vec![0u8; SIZE as usize];
        data[(3 * REGION_SIZE_BYTES) as usize] = 7;
        std::fs::write(&path, &data).unwrap();
        let sums = checksums(&path, SIZE, &[2, 3, 4, 100]).unwrap();
        let zero = crc32fast::hash(&vec![0u8; REGION_SIZE_BYTES as usize]);
        assert_eq!(sums[0], zero);
        assert_ne!(sums[1], zero);
        assert_eq!(sums[2], zero);
        assert_eq!(sums[3], crc32fast::hash(&[0u8; 4096]));
        // O_DIRECT may be refused by the temporary file system (tmpfs).
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
