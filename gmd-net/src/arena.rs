//! Buffers reused in place: a few large arenas that messages or datagrams
//! are carved from (`BytesMut::split`), each reclaimed whole once every
//! piece carved from it has been dropped.
//!
//! A carved piece is a shared `Bytes` view of its arena, so cloning it never
//! allocates, and an arena whose pieces are all gone is reused without
//! allocating (`BytesMut::try_reclaim`). In a steady stream of messages the
//! heap is touched only when more are in flight than the kept arenas hold.

use bytes::BytesMut;

/// A small pool of arenas.
#[derive(Debug)]
pub struct Arenas {
    kept: Vec<BytesMut>,
    keep: usize,
    arena_bytes: usize,
    zeroed: bool,
    /// The buffer handed out for a request larger than an arena (not kept).
    oversize: BytesMut,
}

impl Arenas {
    /// Keeps up to `keep` arenas of `arena_bytes` each; `zeroed`: each new
    /// arena's whole allocation is zero-filled once, so that (since it is only
    /// ever overwritten afterwards) its spare capacity is initialised memory
    /// a system call may write into.
    pub fn new(keep: usize, arena_bytes: usize, zeroed: bool) -> Arenas {
        Arenas {
            kept: Vec::with_capacity(keep),
            keep: keep.max(1),
            arena_bytes,
            zeroed,
            oversize: BytesMut::new(),
        }
    }

    /// An empty buffer with room for at least `need` bytes: the first kept
    /// arena with that much room left, or one whose pieces have all been
    /// dropped (reclaimed from its start, without allocating), else a new
    /// arena. When all `keep` are still in use, the oldest is let go (its
    /// pieces keep its memory until they are dropped). A request larger than
    /// an arena gets a buffer of its own, not kept.
    pub fn arena(&mut self, need: usize) -> &mut BytesMut {
        if need > self.arena_bytes {
            self.oversize = self.fresh(need);
            return &mut self.oversize;
        }
        let k = match self.kept.iter_mut().position(|a| a.try_reclaim(need)) {
            Some(k) => k,
            None => {
                let fresh = self.fresh(self.arena_bytes);
                if self.kept.len() == self.keep {
                    self.kept.remove(0);
                }
                self.kept.push(fresh);
                self.kept.len() - 1
            }
        };
        &mut self.kept[k]
    }

    /// How many arenas are kept.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    fn fresh(&self, bytes: usize) -> BytesMut {
        if self.zeroed {
            let mut fresh = BytesMut::zeroed(bytes);
            fresh.clear();
            fresh
        } else {
            BytesMut::with_capacity(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn an_arena_is_reused_once_its_pieces_are_dropped() {
        let mut arenas = Arenas::new(4, 4096, true);
        let a = arenas.arena(4096);
        let first = a.as_ptr();
        a.extend_from_slice(b"datagram");
        let held = a.split().freeze();
        // 4 088 bytes left in the first arena: a whole one goes elsewhere.
        let b = arenas.arena(4096);
        assert_ne!(b.as_ptr(), first);
        assert_eq!(b.capacity(), 4096);
        assert!(b.is_empty());
        drop(held);
        // Reclaimed in place, from the start of its allocation.
        assert_eq!(arenas.arena(4096).as_ptr(), first);
        assert_eq!(arenas.kept(), 2, "no new allocation");
    }

    #[test]
    fn small_pieces_share_an_arena() {
        let mut arenas = Arenas::new(2, 1024, false);
        let pieces: Vec<Bytes> = (0..10u8)
            .map(|i| {
                let a = arenas.arena(100);
                a.extend_from_slice(&[i; 100]);
                a.split().freeze()
            })
            .collect();
        assert_eq!(arenas.kept(), 1, "ten pieces of 100 bytes in one arena");
        for (i, p) in pieces.iter().enumerate() {
            assert_eq!(&p[..], &[i as u8; 100][..]);
        }
    }

    #[test]
    fn at_most_the_limit_of_arenas_is_kept() {
        let mut arenas = Arenas::new(4, 1024, true);
        let held: Vec<Bytes> = (0..6)
            .map(|_| {
                let a = arenas.arena(1024);
                a.extend_from_slice(b"x");
                a.split().freeze()
            })
            .collect();
        assert_eq!(arenas.kept(), 4);
        assert!(
            held.iter().all(|d| &d[..] == b"x"),
            "pieces outlive their arena's handle"
        );
    }

    #[test]
    fn a_request_larger_than_an_arena_gets_its_own_buffer() {
        let mut arenas = Arenas::new(4, 1024, false);
        let big = arenas.arena(5000);
        assert!(big.capacity() >= 5000);
        big.extend_from_slice(&[1; 5000]);
        let piece = big.split().freeze();
        assert_eq!(piece.len(), 5000);
        assert_eq!(arenas.kept(), 0, "not kept");
    }
}
