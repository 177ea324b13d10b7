//! gmd-core: state map, configuration, device lifecycle and the local data path.
