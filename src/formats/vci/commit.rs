//! The commit: the tree written copy-on-write, the bitmap, a sync, then
//! the header switched to the new root; and the clean close.

use super::{Vci, NODE_BLOCKS};
use crate::error::{Error, Result};

impl Vci {
    /// Writes the tree copy-on-write, the bitmap, then switches the header
    /// to the new root; see the module documentation.
    pub(super) fn commit(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.unsynced {
            self.file
                .sync_data()
                .map_err(|e| Error::write("VCI data sync", 0, e))?;
            self.unsynced = false;
        }
        if !self.dirty && !self.header_dirty {
            return Ok(());
        }
        let (root, nodes, depth) = if self.dirty {
            self.write_tree()?
        } else {
            (self.header.root, self.tree_nodes.clone(), self.depth)
        };
        self.write_bitmap()?;
        self.file
            .sync_data()
            .map_err(|e| Error::write("VCI metadata sync", 0, e))?;
        let old_root = self.header.root;
        self.header.root = root;
        if let Err(e) = self.write_header().and_then(|_| {
            self.file
                .sync_data()
                .map_err(|e| Error::write("VCI header sync", 0, e))
        }) {
            self.header.root = old_root;
            return Err(e);
        }
        if self.dirty {
            let old = std::mem::replace(&mut self.tree_nodes, nodes);
            for n in old {
                self.set_bits(n, NODE_BLOCKS, false);
            }
            self.depth = depth;
        }
        for (a, l) in std::mem::take(&mut self.pending_free) {
            self.set_bits(a, l, false);
        }
        self.dirty = false;
        self.header_dirty = false;
        Ok(())
    }

    /// Drops the image as a crash would: nothing more is written (tests).
    #[cfg(feature = "test-utils")]
    pub fn simulate_crash(mut self) {
        self.closed = true;
    }

    pub(super) fn close_inner(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.commit()?;
        self.write_bitmap()?;
        self.file
            .sync_data()
            .map_err(|e| Error::write("VCI bitmap sync", 0, e))?;
        self.header.unclean = false;
        self.write_header()?;
        self.file
            .sync_data()
            .map_err(|e| Error::write("VCI header sync", 0, e))
    }
}
