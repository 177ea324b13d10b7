//! ublk frontend: serves a GeoMirror device as `/dev/ublkb<minor>`.
//!
//! The frontend translates ublk descriptors into engine requests and results
//! into errnos; it contains no mirroring logic.
