//! The state map: what differs between the two sides of a GeoMirror device.
//!
//! - [`cells`]: the in-memory map (pure).
//! - [`format`]: the versioned on-disk format with two copies of every block.
//! - [`file`]: creating, loading and synchronously updating a map on disk.
//! - [`dump`]: machine-readable map files and the human-readable rendering.

pub mod cells;
pub mod dump;
pub mod file;
pub mod format;

pub use cells::{CellClass, CellValue, StateMap};
pub use file::{MapError, MapFile, PageSlots};
pub use format::{AdminState, Superblock};
