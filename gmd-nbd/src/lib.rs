//! NBD export of GeoMirror devices.
