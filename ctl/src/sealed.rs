//! Records blkrep writes as JSON files (baselines, drill reports) carry a blake3 of their
//! own serialization without the `sum` field, so that damage or an edit is detected.

use serde::Serialize;

pub trait Sealed: Serialize + Clone {
    /// Hex digits of the hash kept in `sum`.
    const DIGITS: usize = 64;

    /// The record's `sum` field.
    fn sum_mut(&mut self) -> &mut Option<String>;

    /// The hash of the record with `sum` left out.
    fn digest(&self) -> String {
        let mut bare = self.clone();
        *bare.sum_mut() = None;
        let json = serde_json::to_string(&bare).expect("records serialize");
        blake3::hash(json.as_bytes()).to_hex()[..Self::DIGITS].to_string()
    }

    /// Set `sum`.
    fn seal(&mut self) {
        let d = self.digest();
        *self.sum_mut() = Some(d);
    }

    /// True when `sum` matches the content.
    fn intact(&self) -> bool {
        let mut me = self.clone();
        me.sum_mut().take() == Some(self.digest())
    }
}
