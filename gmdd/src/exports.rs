//! The NBD view of the daemon's devices: one export per AVAILABLE device,
//! with a lease count that makes the device "in use".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use gmd_core::buf::BufPool;
use gmd_core::config::Device;
use gmd_core::device::{DEVICE_SLOTS, IO_LEN_MAX};
use gmd_core::runtime::{Submission, Submitter};
use gmd_nbd::{Export, Lease, Registry};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// A running device as exported over NBD.
pub(super) struct DeviceExport {
    /// Device name (the export name).
    pub(super) name: String,
    size_bytes: u64,
    block_size: u32,
    io_len_max: u32,
    /// Secondary: new clients are told the export is read-only (writes
    /// are refused by the device in any case).
    read_only: AtomicBool,
    submitter: Submitter,
    pool: BufPool,
    admission: Semaphore,
    leases: AtomicU64,
    fence: CancellationToken,
}

impl DeviceExport {
    /// An export of `device` that submits to its running device thread.
    pub(super) fn new(
        device: &Device,
        read_only: bool,
        submitter: Submitter,
        pool: BufPool,
    ) -> Self {
        DeviceExport {
            name: device.name.clone(),
            size_bytes: device.size_bytes,
            block_size: device.block_size,
            io_len_max: IO_LEN_MAX,
            read_only: AtomicBool::new(read_only),
            submitter,
            pool,
            admission: Semaphore::new(DEVICE_SLOTS),
            leases: AtomicU64::new(0),
            fence: CancellationToken::new(),
        }
    }

    /// Clients connected.
    pub(super) fn clients(&self) -> u64 {
        self.leases.load(Ordering::SeqCst)
    }
}

impl Export for DeviceExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn io_len_max(&self) -> u32 {
        self.io_len_max
    }
    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }
    fn buffers(&self) -> &BufPool {
        &self.pool
    }
    fn admission(&self) -> &Semaphore {
        &self.admission
    }
    fn submit(&self, submission: Submission) -> Result<(), Submission> {
        self.submitter.submit(submission)
    }
    fn fence(&self) -> &CancellationToken {
        &self.fence
    }
}

struct ExportLease(Arc<DeviceExport>);

impl Drop for ExportLease {
    fn drop(&mut self) {
        self.0.leases.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The exports of the daemon, shared with the NBD server.
#[derive(Default)]
pub(super) struct Exports {
    table: RwLock<HashMap<String, Arc<DeviceExport>>>,
}

impl Exports {
    /// Offers an export.
    pub(super) fn insert(&self, export: Arc<DeviceExport>) {
        self.table
            .write()
            .expect("exports lock")
            .insert(export.name.clone(), export);
    }

    /// Withdraws `name` unless clients use it; returns the number of clients
    /// that prevented it (0 = withdrawn or not exported).
    pub(super) fn withdraw_unless_in_use(&self, name: &str) -> u64 {
        let mut table = self.table.write().expect("exports lock");
        match table.get(name) {
            Some(e) if e.clients() > 0 => e.clients(),
            Some(_) => {
                table.remove(name);
                0
            }
            None => 0,
        }
    }

    /// Withdraws `name` whatever its clients (daemon shutdown).
    pub(super) fn withdraw(&self, name: &str) {
        self.table.write().expect("exports lock").remove(name);
    }

    /// Withdraws `name` and disconnects its clients once their requests in
    /// flight finish (forced stop); returns the export to wait on.
    pub(super) fn fence(&self, name: &str) -> Option<Arc<DeviceExport>> {
        let export = self.table.write().expect("exports lock").remove(name)?;
        export.fence.cancel();
        Some(export)
    }

    /// Tells new clients of `name` whether it is read-only (a role change).
    pub(super) fn set_read_only(&self, name: &str, read_only: bool) {
        if let Some(e) = self.table.read().expect("exports lock").get(name) {
            e.read_only.store(read_only, Ordering::SeqCst);
        }
    }

    /// Whether `name` is exported.
    pub(super) fn contains(&self, name: &str) -> bool {
        self.table.read().expect("exports lock").contains_key(name)
    }

    /// Clients of `name`.
    pub(super) fn clients(&self, name: &str) -> u64 {
        self.table
            .read()
            .expect("exports lock")
            .get(name)
            .map_or(0, |e| e.clients())
    }

    /// Total clients of all exports.
    pub(super) fn total_clients(&self) -> u64 {
        self.table
            .read()
            .expect("exports lock")
            .values()
            .map(|e| e.clients())
            .sum()
    }
}

impl Registry for Exports {
    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .table
            .read()
            .expect("exports lock")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn describe(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.table
            .read()
            .expect("exports lock")
            .get(name)
            .map(|e| e.clone() as Arc<dyn Export>)
    }

    fn open(&self, name: &str) -> Option<(Arc<dyn Export>, Lease)> {
        let table = self.table.read().expect("exports lock");
        let export = table.get(name)?.clone();
        export.leases.fetch_add(1, Ordering::SeqCst);
        Some((
            export.clone() as Arc<dyn Export>,
            Box::new(ExportLease(export)),
        ))
    }
}
