//! An emulated WAN link between two network namespaces.

pub mod link;
