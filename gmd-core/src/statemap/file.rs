//! A state map stored in a file or block device: create, load and validate,
//! and synchronous updates for administrative commands.
//!
//! The running device writes pages through its own io_uring (see
//! [`crate::runtime`]); it borrows the slot bookkeeping ([`PageSlots`]) from
//! here so that both paths alternate copies the same way.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::cells::StateMap;
use super::format::{
    self, AdminState, BLOCK_SIZE, BlockError, Layout, PAGE_CELL_BYTES, Superblock,
};
use crate::generations::Generations;
use crate::units::{CELL_BITS, REGION_SIZE_BYTES, region_count};
use crate::volume;

/// Why a state map cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The file does not exist.
    #[error("state map {path} does not exist")]
    Missing {
        /// The map's path.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("state map {path}: {source}")]
    Io {
        /// The map's path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Shorter than the layout needs (a truncated file, or too small a volume).
    #[error("state map {path} is truncated or too small: {len_bytes} bytes, needs {needed_bytes}")]
    Truncated {
        /// The map's path.
        path: PathBuf,
        /// Its size.
        len_bytes: u64,
        /// The size the layout needs.
        needed_bytes: u64,
    },
    /// Neither superblock copy carries the gmd magic: not a state map at all.
    #[error("{path} is not a gmd state map (no valid superblock)")]
    NotAMap {
        /// The map's path.
        path: PathBuf,
    },
    /// A block has no valid copy: torn or corrupted beyond what the format tolerates.
    #[error("state map {path} is corrupt: {what}")]
    Corrupt {
        /// The map's path.
        path: PathBuf,
        /// Which block and why.
        what: String,
    },
    /// The map describes a device of another size.
    #[error(
        "state map {path} describes a device of {map_bytes} bytes but the configured size is {config_bytes} bytes"
    )]
    SizeMismatch {
        /// The map's path.
        path: PathBuf,
        /// Size recorded in the map.
        map_bytes: u64,
        /// Size in the configuration.
        config_bytes: u64,
    },
    /// Another process (or a configured device) holds the map.
    #[error("state map {path} is in use by another process or a configured device")]
    Busy {
        /// The map's path.
        path: PathBuf,
    },
    /// A valid map is already there and overwriting was not forced.
    #[error("state map {path} already holds a valid map of device {uuid}")]
    Exists {
        /// The map's path.
        path: PathBuf,
        /// The device it belongs to.
        uuid: Uuid,
    },
}

impl MapError {
    /// Whether the map's content cannot be trusted (as opposed to an I/O or
    /// configuration problem); the recovery is to mark the whole map stale.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            MapError::Truncated { .. } | MapError::NotAMap { .. } | MapError::Corrupt { .. }
        )
    }
}

/// Which copy of each page holds the newest valid version, and its sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSlots {
    current: Vec<(u8, u64)>,
}

impl PageSlots {
    /// Slots for a map whose pages were all just written to copy 0 with sequence 1.
    fn fresh(page_count: u64) -> Self {
        PageSlots {
            current: vec![(0, 1); page_count as usize],
        }
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.current.len() as u64
    }

    /// The copy and sequence number the next update of `page_index` must use.
    pub fn next(&self, page_index: u64) -> (u8, u64) {
        let (slot, seq) = self.current[page_index as usize];
        (slot ^ 1, seq + 1)
    }

    /// Records that copy `slot` of `page_index` now durably holds sequence `seq`.
    pub fn commit(&mut self, page_index: u64, slot: u8, seq: u64) {
        self.current[page_index as usize] = (slot, seq);
    }
}

/// An open state map with its superblock, used by administrative commands and
/// by the device while it is configured.
#[derive(Debug)]
pub struct MapFile {
    path: PathBuf,
    file: File,
    layout: Layout,
    superblock: Superblock,
    super_slot: u8,
    super_seq: u64,
    pages: PageSlots,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MapError + '_ {
    move |source| MapError::Io {
        path: path.to_owned(),
        source,
    }
}

fn open_file(path: &Path, create: bool) -> Result<File, MapError> {
    let file = open_unlocked(path, create)?;
    // SAFETY: flock on a descriptor we own; the lock lives as long as the file.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(MapError::Busy {
                path: path.to_owned(),
            });
        }
        return Err(MapError::Io {
            path: path.to_owned(),
            source: err,
        });
    }
    Ok(file)
}

fn open_unlocked(path: &Path, create: bool) -> Result<File, MapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                MapError::Missing {
                    path: path.to_owned(),
                }
            } else {
                MapError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })
}

impl MapFile {
    /// Writes a fresh, clean map for a device of `device_size_bytes` with
    /// identity `uuid`, holding no known data ([`Generations::none`]).
    ///
    /// # Errors
    /// As [`MapFile::create_with`].
    pub fn create(
        path: &Path,
        uuid: Uuid,
        device_size_bytes: u64,
        force: bool,
    ) -> Result<MapFile, MapError> {
        Self::create_with(path, uuid, device_size_bytes, Generations::none(), force)
    }

    /// Writes a fresh, clean map for a device of `device_size_bytes` with
    /// identity `uuid` and data generations `generations`.
    ///
    /// A regular file is created or extended as needed; a block device must be
    /// large enough. A valid map already in place is only replaced when `force`.
    ///
    /// # Errors
    /// [`MapError::Exists`] without `force`; I/O errors; a block device too small.
    pub fn create_with(
        path: &Path,
        uuid: Uuid,
        device_size_bytes: u64,
        generations: Generations,
        force: bool,
    ) -> Result<MapFile, MapError> {
        if !force {
            if let Ok((existing, _)) = MapFile::open(path, None) {
                return Err(MapError::Exists {
                    path: path.to_owned(),
                    uuid: existing.superblock.uuid,
                });
            }
        }
        let existed = path.exists();
        let file = open_file(path, true)?;
        let regions = region_count(device_size_bytes);
        let layout = Layout::for_regions(regions);
        let needed = layout.file_size_bytes();
        let len = volume::size_bytes(&file).map_err(io_err(path))?;
        if len < needed {
            if volume::is_block_device(path) {
                return Err(MapError::Truncated {
                    path: path.to_owned(),
                    len_bytes: len,
                    needed_bytes: needed,
                });
            }
            file.set_len(needed).map_err(io_err(path))?;
        }
        let superblock = Superblock {
            uuid,
            device_size_bytes,
            region_size_bytes: REGION_SIZE_BYTES,
            cell_bits: CELL_BITS,
            region_count: regions,
            page_count: layout.page_count,
            generation: 1,
            admin_state: AdminState::Defined,
            peers_down: Vec::new(),
            generations,
            role: crate::link::PairRole::Secondary,
            role_recorded: true,
            ran_primary: false,
        };
        let mut map = MapFile {
            path: path.to_owned(),
            file,
            layout,
            superblock,
            super_slot: 1,
            super_seq: 0,
            pages: PageSlots::fresh(layout.page_count),
        };
        // Invalidate copy B of everything first, so that no block of an older
        // map at this place can outrank the new one.
        let zero = vec![0u8; BLOCK_SIZE];
        map.write_at(&zero, Layout::superblock_offset(1))?;
        for page in 0..layout.page_count {
            map.write_at(&zero, Layout::page_offset(page, 1))?;
        }
        let clean = StateMap::new(device_size_bytes);
        let mut block = vec![0u8; BLOCK_SIZE];
        for page in 0..layout.page_count {
            let cells = &clean.packed()[Layout::page_cells(page, clean.packed().len())];
            format::encode_page(&uuid, page, 1, cells, &mut block);
            map.write_at(&block, Layout::page_offset(page, 0))?;
        }
        map.sync()?;
        // Superblock last: until it is written the map does not exist.
        map.super_slot = 1;
        map.super_seq = 0;
        map.write_superblock_now()?;
        if !existed {
            volume::sync_parent_dir(path).map_err(io_err(path))?;
        }
        Ok(map)
    }

    /// Opens and validates a map; returns it with the cells it holds.
    ///
    /// With `config_size_bytes`, a map of another device size is refused.
    ///
    /// # Errors
    /// [`MapError`] naming what is wrong; a damaged map is never read as clean.
    pub fn open(
        path: &Path,
        config_size_bytes: Option<u64>,
    ) -> Result<(MapFile, StateMap), MapError> {
        let file = open_file(path, false)?;
        let len = volume::size_bytes(&file).map_err(io_err(path))?;
        if len < 2 * BLOCK_SIZE as u64 {
            return Err(MapError::Truncated {
                path: path.to_owned(),
                len_bytes: len,
                needed_bytes: Layout::for_regions(1).file_size_bytes(),
            });
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        let mut best: Option<(Superblock, u64, u8)> = None;
        let mut errors = Vec::new();
        for slot in 0..2u8 {
            file.read_exact_at(&mut block, Layout::superblock_offset(slot))
                .map_err(io_err(path))?;
            match format::decode_superblock(&block) {
                Ok((sb, seq)) => {
                    if best.as_ref().is_none_or(|(_, best_seq, _)| seq > *best_seq) {
                        best = Some((sb, seq, slot));
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        let Some((superblock, super_seq, super_slot)) = best else {
            if errors.iter().all(|e| *e == BlockError::BadMagic) {
                return Err(MapError::NotAMap {
                    path: path.to_owned(),
                });
            }
            return Err(MapError::Corrupt {
                path: path.to_owned(),
                what: format!(
                    "no valid superblock (copy A: {}; copy B: {})",
                    errors[0], errors[1]
                ),
            });
        };
        if let Some(config) = config_size_bytes {
            if config != superblock.device_size_bytes {
                return Err(MapError::SizeMismatch {
                    path: path.to_owned(),
                    map_bytes: superblock.device_size_bytes,
                    config_bytes: config,
                });
            }
        }
        let layout = Layout {
            page_count: superblock.page_count,
        };
        if len < layout.file_size_bytes() {
            return Err(MapError::Truncated {
                path: path.to_owned(),
                len_bytes: len,
                needed_bytes: layout.file_size_bytes(),
            });
        }
        let mut cells = StateMap::new(superblock.device_size_bytes);
        let mut packed = cells.packed().to_vec();
        let mut slots = PageSlots::fresh(layout.page_count);
        let mut copy = vec![0u8; BLOCK_SIZE];
        for page in 0..layout.page_count {
            file.read_exact_at(&mut block, Layout::page_offset(page, 0))
                .map_err(io_err(path))?;
            file.read_exact_at(&mut copy, Layout::page_offset(page, 1))
                .map_err(io_err(path))?;
            let a = format::decode_page(&block, &superblock.uuid, page);
            let b = format::decode_page(&copy, &superblock.uuid, page);
            let (slot, seq, page_cells) = match (&a, &b) {
                (Ok((sa, ca)), Ok((sb, cb))) => {
                    if sa >= sb {
                        (0, *sa, *ca)
                    } else {
                        (1, *sb, *cb)
                    }
                }
                (Ok((sa, ca)), Err(_)) => (0, *sa, *ca),
                (Err(_), Ok((sb, cb))) => (1, *sb, *cb),
                (Err(ea), Err(eb)) => {
                    return Err(MapError::Corrupt {
                        path: path.to_owned(),
                        what: format!("page {page} has no valid copy (A: {ea}; B: {eb})"),
                    });
                }
            };
            let range = Layout::page_cells(page, packed.len());
            let n = range.len();
            packed[range].copy_from_slice(&page_cells[..n]);
            if page_cells[n..PAGE_CELL_BYTES].iter().any(|&b| b != 0) {
                return Err(MapError::Corrupt {
                    path: path.to_owned(),
                    what: format!("page {page} has cells beyond the end of the device"),
                });
            }
            slots.commit(page, slot, seq);
        }
        cells = StateMap::from_packed(superblock.device_size_bytes, packed)
            .expect("packed length derives from the same size");
        Ok((
            MapFile {
                path: path.to_owned(),
                file,
                layout,
                superblock,
                super_slot,
                super_seq,
                pages: slots,
            },
            cells,
        ))
    }

    /// Finds the device UUID in a damaged map: from a valid superblock copy,
    /// else from the first valid page.
    pub fn salvage_uuid(path: &Path) -> Option<Uuid> {
        if let Some(sb) = Self::salvage_superblock(path) {
            return Some(sb.uuid);
        }
        let file = File::open(path).ok()?;
        let len = volume::size_bytes(&file).ok()?;
        let mut block = vec![0u8; BLOCK_SIZE];
        let mut offset = Layout::page_offset(0, 0);
        while offset + BLOCK_SIZE as u64 <= len {
            if file.read_exact_at(&mut block, offset).is_ok() {
                if let Ok((uuid, _, _, _)) = format::decode_page_any(&block) {
                    return Some(uuid);
                }
            }
            offset += BLOCK_SIZE as u64;
        }
        None
    }

    /// The newest valid superblock of a map whose pages may be damaged.
    pub fn salvage_superblock(path: &Path) -> Option<Superblock> {
        let file = File::open(path).ok()?;
        let mut block = vec![0u8; BLOCK_SIZE];
        let mut best: Option<(Superblock, u64)> = None;
        for slot in 0..2 {
            if file
                .read_exact_at(&mut block, Layout::superblock_offset(slot))
                .is_ok()
            {
                if let Ok((sb, seq)) = format::decode_superblock(&block) {
                    if best.as_ref().is_none_or(|(_, s)| seq > *s) {
                        best = Some((sb, seq));
                    }
                }
            }
        }
        best.map(|(sb, _)| sb)
    }

    /// The map's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// The layout of the pages.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The slot bookkeeping, for the running device to continue from.
    pub fn page_slots(&self) -> &PageSlots {
        &self.pages
    }

    /// Takes back the slot bookkeeping after the running device stopped.
    pub fn set_page_slots(&mut self, slots: PageSlots) {
        assert_eq!(slots.page_count(), self.layout.page_count);
        self.pages = slots;
    }

    /// The superblock with the copy that holds it and its sequence number,
    /// for the running device, which writes it from then on.
    pub fn superblock_state(&self) -> (Superblock, u8, u64) {
        (self.superblock.clone(), self.super_slot, self.super_seq)
    }

    /// Records what the running device wrote for it (the peers down), so
    /// that readers of this copy see it while the device runs.
    pub fn note_peers_down(&mut self, peers_down: Vec<String>) {
        self.superblock.peers_down = peers_down;
    }

    /// Takes back the superblock after the running device stopped.
    pub fn set_superblock_state(&mut self, (superblock, slot, seq): (Superblock, u8, u64)) {
        assert_eq!(superblock.uuid, self.superblock.uuid);
        self.superblock = superblock;
        self.super_slot = slot;
        self.super_seq = seq;
    }

    /// Changes the superblock with `change` and writes it durably (generation + 1).
    ///
    /// # Errors
    /// The write or the sync failed; the in-memory superblock is then unchanged.
    pub fn update_superblock(
        &mut self,
        change: impl FnOnce(&mut Superblock),
    ) -> Result<(), MapError> {
        let before = self.superblock.clone();
        change(&mut self.superblock);
        self.superblock.generation += 1;
        if let Err(e) = self.write_superblock_now() {
            self.superblock = before;
            return Err(e);
        }
        Ok(())
    }

    fn write_superblock_now(&mut self) -> Result<(), MapError> {
        let slot = self.super_slot ^ 1;
        let seq = self.super_seq + 1;
        let mut block = vec![0u8; BLOCK_SIZE];
        format::encode_superblock(&self.superblock, seq, &mut block);
        self.write_at(&block, Layout::superblock_offset(slot))?;
        self.sync()?;
        self.super_slot = slot;
        self.super_seq = seq;
        Ok(())
    }

    /// Writes the given pages of `cells` durably, each to its older copy.
    ///
    /// # Errors
    /// A write or the sync failed; pages already written stay valid either way.
    pub fn write_pages(
        &mut self,
        cells: &StateMap,
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<(), MapError> {
        let mut block = vec![0u8; BLOCK_SIZE];
        let mut written = Vec::new();
        for page in pages {
            let (slot, seq) = self.pages.next(page);
            let range = Layout::page_cells(page, cells.packed().len());
            format::encode_page(
                &self.superblock.uuid,
                page,
                seq,
                &cells.packed()[range],
                &mut block,
            );
            self.write_at(&block, Layout::page_offset(page, slot))?;
            written.push((page, slot, seq));
        }
        self.sync()?;
        for (page, slot, seq) in written {
            self.pages.commit(page, slot, seq);
        }
        Ok(())
    }

    /// Writes every page of `cells` durably.
    ///
    /// # Errors
    /// As [`MapFile::write_pages`].
    pub fn write_all(&mut self, cells: &StateMap) -> Result<(), MapError> {
        self.write_pages(cells, 0..self.layout.page_count)
    }

    fn write_at(&self, block: &[u8], offset: u64) -> Result<(), MapError> {
        self.file
            .write_all_at(block, offset)
            .map_err(io_err(&self.path))
    }

    fn sync(&self) -> Result<(), MapError> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statemap::cells::CELL_STALE;

    const SIZE: u64 = 600 << 20; // three pages

    fn fresh(dir: &tempfile::TempDir) -> (PathBuf, MapFile) {
        let path = dir.path().join("map.sm");
        let map = MapFile::create(&path, Uuid::from_u128(77), SIZE, false).unwrap();
        (path, map)
    }

    #[test]
    fn created_map_opens_clean() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = fresh(&dir);
        let (file, cells) = MapFile::open(&path, Some(SIZE)).unwrap();
        assert!(cells.is_clean());
        assert_eq!(file.superblock().uuid, Uuid::from_u128(77));
        assert_eq!(file.layout().page_count, 3);
    }

    #[test]
    fn create_refuses_to_overwrite_a_valid_map_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = fresh(&dir);
        assert!(matches!(
            MapFile::create(&path, Uuid::from_u128(1), SIZE, false),
            Err(MapError::Exists { .. })
        ));
        MapFile::create(&path, Uuid::from_u128(1), SIZE, true).unwrap();
        let (file, _) = MapFile::open(&path, None).unwrap();
        assert_eq!(file.superblock().uuid, Uuid::from_u128(1));
    }

    #[test]
    fn pages_and_superblock_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut file) = fresh(&dir);
        let mut cells = StateMap::new(SIZE);
        cells.mark_bytes(300 << 20, 4096, CELL_STALE);
        file.write_all(&cells).unwrap();
        // A second update goes to the other copy and wins on reopen.
        cells.mark_bytes(0, 1, CELL_STALE);
        file.write_pages(&cells, [0]).unwrap();
        file.update_superblock(|sb| {
            sb.admin_state = AdminState::Available;
            sb.peers_down = vec!["beta".into()];
        })
        .unwrap();
        let slots = file.page_slots().clone();
        drop(file);
        let (again, loaded) = MapFile::open(&path, Some(SIZE)).unwrap();
        assert_eq!(loaded, cells);
        assert_eq!(again.superblock().admin_state, AdminState::Available);
        assert_eq!(again.superblock().peers_down, vec!["beta".to_string()]);
        assert_eq!(again.superblock().generation, 2);
        assert_eq!(again.page_slots(), &slots);
    }

    #[test]
    fn a_map_held_open_is_busy_for_others() {
        let dir = tempfile::tempdir().unwrap();
        let (path, held) = fresh(&dir);
        assert!(matches!(
            MapFile::open(&path, None),
            Err(MapError::Busy { .. })
        ));
        drop(held);
        MapFile::open(&path, None).unwrap();
    }

    #[test]
    fn wrong_size_truncated_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = fresh(&dir);
        assert!(matches!(
            MapFile::open(&path, Some(SIZE * 2)),
            Err(MapError::SizeMismatch { .. })
        ));
        let truncated = dir.path().join("short.sm");
        std::fs::copy(&path, &truncated).unwrap();
        let f = OpenOptions::new().write(true).open(&truncated).unwrap();
        f.set_len(20000).unwrap();
        let err = MapFile::open(&truncated, None).unwrap_err();
        assert!(matches!(err, MapError::Truncated { .. }), "{err}");
        assert!(err.is_damage());
        let foreign = dir.path().join("foreign.sm");
        std::fs::write(&foreign, vec![0x5au8; 64 << 10]).unwrap();
        let err = MapFile::open(&foreign, None).unwrap_err();
        assert!(matches!(err, MapError::NotAMap { .. }), "{err}");
        let missing = dir.path().join("nope.sm");
        assert!(matches!(
            MapFile::open(&missing, None),
            Err(MapError::Missing { .. })
        ));
    }

    #[test]
    fn a_page_with_both_copies_damaged_is_refused_and_uuid_salvaged() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = fresh(&dir);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 16], Layout::page_offset(1, 0) + 100)
            .unwrap();
        f.write_all_at(&[0xff; 16], Layout::page_offset(1, 1) + 100)
            .unwrap();
        let err = MapFile::open(&path, None).unwrap_err();
        assert!(matches!(err, MapError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("page 1"));
        assert_eq!(MapFile::salvage_uuid(&path), Some(Uuid::from_u128(77)));
    }

    #[test]
    fn a_page_copied_from_another_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = fresh(&dir);
        let other = dir.path().join("other.sm");
        MapFile::create(&other, Uuid::from_u128(78), SIZE, false).unwrap();
        let mut block = vec![0u8; BLOCK_SIZE];
        File::open(&other)
            .unwrap()
            .read_exact_at(&mut block, Layout::page_offset(2, 0))
            .unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&block, Layout::page_offset(2, 0)).unwrap();
        let err = MapFile::open(&path, None).unwrap_err();
        assert!(matches!(err, MapError::Corrupt { .. }), "{err}");
    }

    mod crash {
        use super::*;
        use crate::statemap::cells::CELL_WRITING;
        use proptest::prelude::*;

        const SIZE: u64 = 600 << 20;

        fn regions() -> impl Strategy<Value = Vec<u64>> {
            let count = crate::units::region_count(SIZE);
            proptest::collection::vec(0..count, 0..40)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// A page update torn at any byte leaves the old or the new page,
            /// and never a clean cell for a region whose mark was durable.
            #[test]
            fn torn_page_update_keeps_every_durable_mark(
                history in proptest::collection::vec(regions(), 1..4),
                new_marks in regions(),
                clears in regions(),
                cut in 0usize..=BLOCK_SIZE,
            ) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("map.sm");
                let mut file = MapFile::create(&path, Uuid::from_u128(5), SIZE, false).unwrap();
                let mut durable = StateMap::new(SIZE);
                for step in &history {
                    for &r in step {
                        durable.set(r, CELL_STALE);
                    }
                    file.write_all(&durable).unwrap();
                }
                let mut next = durable.clone();
                for &r in &new_marks {
                    next.set(r, CELL_WRITING);
                }
                for &r in &clears {
                    next.set(r, 0);
                }
                // Tear the update of every page at byte `cut`.
                let raw = OpenOptions::new().write(true).open(&path).unwrap();
                let mut block = vec![0u8; BLOCK_SIZE];
                for page in 0..file.layout().page_count {
                    let (slot, seq) = file.page_slots().next(page);
                    let range = Layout::page_cells(page, next.packed().len());
                    format::encode_page(&Uuid::from_u128(5), page, seq, &next.packed()[range], &mut block);
                    raw.write_all_at(&block[..cut], Layout::page_offset(page, slot)).unwrap();
                }
                drop(raw);
                let page_count = file.layout().page_count;
                drop(file);
                let (_, loaded) = MapFile::open(&path, Some(SIZE)).unwrap();
                for page in 0..page_count {
                    let range = Layout::page_cells(page, next.packed().len());
                    let got = &loaded.packed()[range.clone()];
                    prop_assert!(got == &durable.packed()[range.clone()] || got == &next.packed()[range],
                        "page {} is neither the old nor the new version", page);
                }
                for region in 0..durable.region_count() {
                    if durable.get(region) != 0 && !clears.contains(&region) {
                        prop_assert!(loaded.get(region) != 0, "region {} lost its mark", region);
                    }
                }
            }

            /// A superblock update torn at any byte leaves the old or the new superblock.
            #[test]
            fn torn_superblock_update_keeps_old_or_new(cut in 0usize..=BLOCK_SIZE, updates in 0usize..3) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("map.sm");
                let mut file = MapFile::create(&path, Uuid::from_u128(6), SIZE, false).unwrap();
                for _ in 0..updates {
                    file.update_superblock(|sb| sb.admin_state = AdminState::Stopped).unwrap();
                }
                let old = file.superblock().clone();
                let mut new = old.clone();
                new.admin_state = AdminState::Available;
                new.peers_down = vec!["beta".into()];
                new.generation += 1;
                let mut block = vec![0u8; BLOCK_SIZE];
                format::encode_superblock(&new, file.super_seq + 1, &mut block);
                let raw = OpenOptions::new().write(true).open(&path).unwrap();
                raw.write_all_at(&block[..cut], Layout::superblock_offset(file.super_slot ^ 1)).unwrap();
                drop(raw);
                drop(file);
                let (loaded, _) = MapFile::open(&path, Some(SIZE)).unwrap();
                prop_assert!(*loaded.superblock() == old || *loaded.superblock() == new);
                if cut == BLOCK_SIZE {
                    prop_assert_eq!(loaded.superblock(), &new);
                }
            }
        }
    }
}
