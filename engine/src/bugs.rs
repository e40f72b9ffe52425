//! Planted bugs: deliberate breakages of the engine that the simulator must catch.
//!
//! Compiled in only with the `planted-bugs` feature, and even then off unless a test
//! switches one on (process-wide). Without the feature, [`on`] is a constant `false` and
//! the branches that use it vanish.

/// A deliberate breakage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Bug {
    /// The secondary issues stream items without waiting for earlier overlapping items or
    /// for the items they depend on.
    ApplyOutOfOrder = 1 << 0,
    /// Sync mode completes client writes without waiting for the peer.
    SyncAckBeforePeer = 1 << 1,
    /// A client flush completes before the local fsync returns.
    FlushAckBeforeDurable = 1 << 2,
    /// While the peer is away, writes are not kept for it, and the resume trusts the queue
    /// to hold the whole gap (stand-in for "skip marking the bitmap while disconnected"
    /// until bitmaps exist).
    DropWhileDisconnected = 1 << 3,
    /// The activity log records nothing: a write reaches the disk and the wire before its
    /// extent is in the metadata, so a crash loses track of blocks that may differ.
    SkipActivityLog = 1 << 4,
    /// A planned promote takes effect at once, on the node's possibly stale view of its
    /// peer, without the peer's confirmation (the road to a split brain).
    PromoteUnconfirmed = 1 << 5,
    /// A trusted journal is replayed to the peer but not redone on the local disk first:
    /// writes a kill caught before they reached the disk exist at the peer only.
    JournalNoRedo = 1 << 6,
    /// A protected catch-up applies writes without saving the old content first: a
    /// takeover's rollback then leaves newer blocks in the "old" image.
    UndoNoSave = 1 << 7,
}

impl Bug {
    /// Every planted bug.
    pub const ALL: [Bug; 8] = [
        Bug::ApplyOutOfOrder,
        Bug::SyncAckBeforePeer,
        Bug::FlushAckBeforeDurable,
        Bug::DropWhileDisconnected,
        Bug::SkipActivityLog,
        Bug::PromoteUnconfirmed,
        Bug::JournalNoRedo,
        Bug::UndoNoSave,
    ];

    /// The name used on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Bug::ApplyOutOfOrder => "apply-out-of-order",
            Bug::SyncAckBeforePeer => "sync-ack-before-peer",
            Bug::FlushAckBeforeDurable => "flush-ack-before-durable",
            Bug::DropWhileDisconnected => "drop-while-disconnected",
            Bug::SkipActivityLog => "skip-activity-log",
            Bug::PromoteUnconfirmed => "promote-unconfirmed",
            Bug::JournalNoRedo => "journal-no-redo",
            Bug::UndoNoSave => "undo-no-save",
        }
    }

    /// Look a bug up by name.
    pub fn from_name(s: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == s)
    }
}

#[cfg(feature = "planted-bugs")]
static ACTIVE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Switch the planted bugs in `set` on (all others off). Process-wide.
#[cfg(feature = "planted-bugs")]
pub fn set_active(set: &[Bug]) {
    let bits = set.iter().fold(0, |a, b| a | *b as u32);
    ACTIVE.store(bits, std::sync::atomic::Ordering::SeqCst);
}

/// True when `bug` is switched on.
#[inline]
pub fn on(bug: Bug) -> bool {
    #[cfg(feature = "planted-bugs")]
    {
        ACTIVE.load(std::sync::atomic::Ordering::Relaxed) & bug as u32 != 0
    }
    #[cfg(not(feature = "planted-bugs"))]
    {
        let _ = bug;
        false
    }
}
