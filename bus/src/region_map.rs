// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A region map for one bus address space, modelled on QEMU's memory API.
//!
//! The map holds a tree of regions: leaves (a device or a RAM region, opaque
//! to the map), aliases (a window onto part of another region) and pure
//! containers (only their subregions are visible). The root is an implicit
//! container that spans the whole 64-bit space. Within a container the
//! subregion with the highest priority wins, and among equal priorities the
//! one added later wins; a container's holes and an alias window's holes let
//! lower-priority siblings show through, and a subregion that sticks out of
//! its parent is clipped to it.
//!
//! The tree is the source of truth. After every successful mutation the map
//! renders it into a flat view: a sorted list of non-overlapping ranges, each
//! mapping to one leaf. [`RegionMap::resolve`] is a binary search over that
//! list, so the per-access path neither walks the tree nor allocates.
//!
//! Aliases name their target by [`RegionId`]. An alias whose target does not
//! exist (yet, or any more) is a hole, and it starts to resolve again if a
//! region with that id is added later.
//!
//! ```
//! use switchboard_bus::addr::{BusAddr, RegionOffset};
//! use switchboard_bus::region_map::{
//!     Parent, Placement, RegionId, RegionKind, RegionMap, RegionSpec,
//! };
//!
//! # fn main() -> switchboard_bus::region_map::Result<()> {
//! let mut map = RegionMap::new();
//! let ram = RegionSpec { size: 0x1000, kind: RegionKind::Leaf("ram") };
//! map.add(RegionId(1), ram, Placement::root(0, 0))?;
//! let mmio = RegionSpec { size: 0x100, kind: RegionKind::Leaf("uart") };
//! map.add(RegionId(2), mmio, Placement::root(0x800, 1))?;
//!
//! let hit = map.resolve(BusAddr(0x810)).expect("uart is mapped");
//! assert_eq!((hit.region, *hit.target), (RegionId(2), "uart"));
//! assert_eq!(hit.offset, RegionOffset(0x10));
//! assert_eq!(hit.section_len, 0xf0);
//! assert_eq!(map.resolve(BusAddr(0x900)).map(|r| r.region), Some(RegionId(1)));
//! assert!(map.resolve(BusAddr(0x1000)).is_none());
//! # Ok(())
//! # }
//! ```

use std::cmp::{max, min};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::addr::{BusAddr, RegionOffset};

/// The most regions that one resolution may pass through, counting every
/// container, alias and the final leaf but not the implicit root.
///
/// The bound keeps rendering shallow and rejects configurations that are
/// almost certainly mistakes.
pub const MAX_DEPTH: usize = 32;

/// One past the last address of the space, 2^64.
const SPACE_END: i128 = 1 << 64;

/// Errors from changing a [`RegionMap`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Adding a region whose id is already in the map.
    #[error("Region {0} already exists")]
    AddDuplicate(RegionId),
    /// Adding a region of size zero.
    #[error("Region {0} has zero size")]
    AddZeroSize(RegionId),
    /// Adding a region that ends beyond 2^64 in its parent's space.
    #[error("Region {id} at {base:#x} with size {size:#x} ends beyond the address space")]
    AddOverflow {
        /// The region being added.
        id: RegionId,
        /// Its base, relative to the parent.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// Adding a region under a parent that is not in the map.
    #[error("Parent {parent} of region {id} does not exist")]
    AddUnknownParent {
        /// The region being added.
        id: RegionId,
        /// The missing parent.
        parent: RegionId,
    },
    /// Adding a region under a parent that is a leaf or an alias.
    #[error("Parent {parent} of region {id} is not a container")]
    AddParentNotContainer {
        /// The region being added.
        id: RegionId,
        /// The parent that cannot hold subregions.
        parent: RegionId,
    },
    /// Adding a region that would let resolution loop back into itself.
    #[error("Region {0} would make resolution cyclic")]
    AddCycle(RegionId),
    /// Adding a region that would chain more than [`MAX_DEPTH`] regions.
    #[error("Region {id} would nest resolution deeper than {max} regions")]
    AddTooDeep {
        /// The region being added.
        id: RegionId,
        /// The limit, [`MAX_DEPTH`].
        max: usize,
    },
    /// Removing a region that is not in the map.
    #[error("Region {0} does not exist")]
    RemoveUnknown(RegionId),
}

/// The result of a [`RegionMap`] mutation.
pub type Result<T> = std::result::Result<T, Error>;

/// The caller-chosen identity of one region in a [`RegionMap`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegionId(pub u64);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a region shows over its range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegionKind<T> {
    /// A device or RAM region that covers its whole range.
    Leaf(T),
    /// A window onto `target`, starting `offset` bytes into it.
    ///
    /// The alias's own size bounds the window. Parts of the window where the
    /// target shows nothing (beyond its size, in its holes, or everywhere
    /// when it does not exist) are holes. The target's own placement plays
    /// no part: only its contents are seen.
    Alias {
        /// The region seen through the window.
        target: RegionId,
        /// Where in `target` the window starts.
        offset: RegionOffset,
    },
    /// A pure container: only its subregions are visible, and its holes let
    /// lower-priority siblings show through.
    Container,
}

/// The size and kind of a region to add.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSpec<T> {
    /// Size in bytes; must not be zero.
    pub size: u64,
    /// What the region shows.
    pub kind: RegionKind<T>,
}

/// The container a mapped region lives in.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Parent {
    /// The implicit root container spanning the whole 64-bit space.
    Root,
    /// A region of kind [`RegionKind::Container`].
    Container(RegionId),
}

/// Where a region sits.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Placement {
    /// Not mapped anywhere; the region is reachable only through aliases.
    Detached,
    /// A subregion of `parent` at `base` (relative to the parent).
    Mapped {
        /// The container holding the region.
        parent: Parent,
        /// Start of the region in the parent's space.
        base: u64,
        /// Higher wins over overlapping siblings; ties go to the later add.
        priority: i32,
    },
}

impl Placement {
    /// A placement directly under the root at `base`.
    pub fn root(base: u64, priority: i32) -> Self {
        Placement::Mapped {
            parent: Parent::Root,
            base,
            priority,
        }
    }

    /// A placement inside container `parent` at `base` (relative to it).
    pub fn inside(parent: RegionId, base: u64, priority: i32) -> Self {
        Placement::Mapped {
            parent: Parent::Container(parent),
            base,
            priority,
        }
    }
}

/// One entry in a container's subregion list.
#[derive(Copy, Clone, Debug)]
struct Subregion {
    id: RegionId,
    base: u64,
    priority: i32,
}

/// A region stored in a [`RegionMap`].
#[derive(Clone, Debug)]
pub struct Region<T> {
    id: RegionId,
    spec: RegionSpec<T>,
    placement: Placement,
    /// Highest priority first; among equal priorities the latest add first.
    /// This is the order in which rendering lets subregions claim space.
    subregions: Vec<Subregion>,
}

impl<T> Region<T> {
    /// The region's id.
    pub fn id(&self) -> RegionId {
        self.id
    }

    /// The size and kind given when the region was added.
    pub fn spec(&self) -> &RegionSpec<T> {
        &self.spec
    }

    /// Where the region sits.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The leaf target, if the region is a leaf.
    pub fn target(&self) -> Option<&T> {
        match &self.spec.kind {
            RegionKind::Leaf(target) => Some(target),
            RegionKind::Alias { .. } | RegionKind::Container => None,
        }
    }

    /// The direct subregions of a container, in the order they claim space:
    /// highest priority first, and the latest add first among equals.
    pub fn subregions(&self) -> impl Iterator<Item = RegionId> + '_ {
        self.subregions.iter().map(|sub| sub.id)
    }
}

/// One range of the flat view: a run of addresses that maps to one leaf with
/// offsets increasing along with the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatRange<T> {
    /// First address of the range.
    pub start: BusAddr,
    /// Length in bytes, never zero. The range may end exactly at 2^64, so
    /// compute its end with [`FlatRange::last`] or in `u128`.
    pub len: u64,
    /// The leaf region the range maps to.
    pub region: RegionId,
    /// The leaf's target.
    pub target: T,
    /// Offset inside the leaf that `start` maps to.
    pub offset: RegionOffset,
}

impl<T> FlatRange<T> {
    /// The last address of the range (inclusive, so it cannot overflow).
    pub fn last(&self) -> BusAddr {
        // `start + len <= 2^64` and `len >= 1`, so this stays in range.
        BusAddr(self.start.0 + (self.len - 1))
    }

    /// Whether `addr` falls inside the range.
    pub fn contains(&self, addr: BusAddr) -> bool {
        addr.0 >= self.start.0 && addr.0 - self.start.0 < self.len
    }
}

/// The outcome of looking up one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved<'a, T> {
    /// The leaf region the address maps to.
    pub region: RegionId,
    /// The leaf's target.
    pub target: &'a T,
    /// Offset inside the leaf.
    pub offset: RegionOffset,
    /// Bytes from the address to the end of the flat section that maps to
    /// the same leaf with contiguous offsets; at least 1. An access of up to
    /// this many bytes goes to `target` in one piece.
    pub section_len: u64,
}

/// A QEMU-style map of regions for one bus address space.
///
/// `T` is the leaf target (a device handle, a RAM region); the map only
/// stores and clones it.
#[derive(Clone, Debug)]
pub struct RegionMap<T> {
    regions: BTreeMap<RegionId, Region<T>>,
    /// Subregions of the implicit root, in claiming order.
    root: Vec<Subregion>,
    /// The rendered tree; rebuilt after every successful mutation.
    flat: Vec<FlatRange<T>>,
}

impl<T: Clone> Default for RegionMap<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> RegionMap<T> {
    /// An empty map: every address is a hole.
    pub fn new() -> Self {
        RegionMap {
            regions: BTreeMap::new(),
            root: Vec::new(),
            flat: Vec::new(),
        }
    }

    /// Adds region `id`.
    ///
    /// Fails without changing the map if the id is taken, the size is zero,
    /// the region would end beyond 2^64 in its parent's space, the parent is
    /// missing or not a container, or the new region would make resolution
    /// cyclic or deeper than [`MAX_DEPTH`]. An alias may name a target that
    /// does not exist yet; until it does, the alias is a hole.
    ///
    /// ```
    /// # use switchboard_bus::region_map::*;
    /// # use switchboard_bus::addr::RegionOffset;
    /// let mut map = RegionMap::new();
    /// let spec = RegionSpec { size: 0x10, kind: RegionKind::Leaf(()) };
    /// map.add(RegionId(1), spec.clone(), Placement::Detached).expect("fresh id");
    /// assert_eq!(
    ///     map.add(RegionId(1), spec, Placement::Detached),
    ///     Err(Error::AddDuplicate(RegionId(1)))
    /// );
    /// let me = RegionKind::Alias { target: RegionId(2), offset: RegionOffset(0) };
    /// let looped = RegionSpec { size: 0x10, kind: me };
    /// assert!(map.add(RegionId(2), looped, Placement::root(0, 0)).is_err());
    /// ```
    pub fn add(&mut self, id: RegionId, spec: RegionSpec<T>, placement: Placement) -> Result<()> {
        if self.regions.contains_key(&id) {
            return Err(Error::AddDuplicate(id));
        }
        if spec.size == 0 {
            return Err(Error::AddZeroSize(id));
        }
        if let Placement::Mapped { parent, base, .. } = placement {
            if u128::from(base) + u128::from(spec.size) > 1u128 << 64 {
                return Err(Error::AddOverflow {
                    id,
                    base,
                    size: spec.size,
                });
            }
            if let Parent::Container(parent) = parent {
                match self.regions.get(&parent) {
                    None => return Err(Error::AddUnknownParent { id, parent }),
                    Some(region) if !matches!(region.spec.kind, RegionKind::Container) => {
                        return Err(Error::AddParentNotContainer { id, parent });
                    }
                    Some(_) => {}
                }
            }
        }

        self.regions.insert(
            id,
            Region {
                id,
                spec,
                placement,
                subregions: Vec::new(),
            },
        );
        if let Placement::Mapped {
            parent,
            base,
            priority,
        } = placement
        {
            if let Some(list) = self.subregions_mut(parent) {
                // The newcomer goes before its equal-priority siblings: the
                // later add wins ties.
                let at = list.partition_point(|sub| sub.priority > priority);
                list.insert(at, Subregion { id, base, priority });
            }
        }

        if let Err(err) = self.check_graph(id) {
            if let Placement::Mapped { parent, .. } = placement {
                self.unlink(parent, id);
            }
            self.regions.remove(&id);
            return Err(err);
        }
        self.rebuild();
        Ok(())
    }

    /// Removes region `id` and, for a container, everything nested in it.
    ///
    /// Returns the targets of the removed leaves (the region itself first,
    /// then its subregions depth first in claiming order) so the caller can
    /// drain them. Aliases elsewhere that pointed at a removed region stay
    /// in the map and become holes.
    pub fn remove(&mut self, id: RegionId) -> Result<Vec<(RegionId, T)>> {
        let placement = match self.regions.get(&id) {
            Some(region) => region.placement,
            None => return Err(Error::RemoveUnknown(id)),
        };
        if let Placement::Mapped { parent, .. } = placement {
            self.unlink(parent, id);
        }
        let mut removed = Vec::new();
        let mut pending = vec![id];
        while let Some(next) = pending.pop() {
            if let Some(region) = self.regions.remove(&next) {
                pending.extend(region.subregions.iter().rev().map(|sub| sub.id));
                if let RegionKind::Leaf(target) = region.spec.kind {
                    removed.push((next, target));
                }
            }
        }
        self.rebuild();
        Ok(removed)
    }

    /// Looks up the leaf that `addr` maps to, or `None` for a hole.
    ///
    /// A binary search over the flat view: O(log n), no allocation.
    pub fn resolve(&self, addr: BusAddr) -> Option<Resolved<'_, T>> {
        let after = self.flat.partition_point(|range| range.start <= addr);
        let range = self.flat.get(after.checked_sub(1)?)?;
        let delta = addr.0 - range.start.0;
        if delta >= range.len {
            return None;
        }
        Some(Resolved {
            region: range.region,
            target: &range.target,
            // The range lies inside its leaf, so the offset stays below the
            // leaf's size.
            offset: RegionOffset(range.offset.0 + delta),
            section_len: range.len - delta,
        })
    }

    /// The rendered map: sorted, non-overlapping ranges, each as long as it
    /// can be (neighbours are merged when they continue the same leaf).
    pub fn flat_view(&self) -> &[FlatRange<T>] {
        &self.flat
    }

    /// The region with id `id`, if present.
    pub fn get(&self, id: RegionId) -> Option<&Region<T>> {
        self.regions.get(&id)
    }

    /// Whether region `id` is present.
    pub fn contains(&self, id: RegionId) -> bool {
        self.regions.contains_key(&id)
    }

    /// The number of regions of every kind, mapped or detached.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether the map holds no regions.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// All regions, in id order.
    pub fn regions(&self) -> impl Iterator<Item = &Region<T>> + '_ {
        self.regions.values()
    }

    /// The targets of all leaf regions, mapped or not, in id order.
    pub fn leaves(&self) -> impl Iterator<Item = (RegionId, &T)> + '_ {
        self.regions
            .values()
            .filter_map(|region| region.target().map(|target| (region.id, target)))
    }

    fn subregions_mut(&mut self, parent: Parent) -> Option<&mut Vec<Subregion>> {
        match parent {
            Parent::Root => Some(&mut self.root),
            Parent::Container(id) => self.regions.get_mut(&id).map(|r| &mut r.subregions),
        }
    }

    fn unlink(&mut self, parent: Parent, id: RegionId) {
        if let Some(list) = self.subregions_mut(parent) {
            list.retain(|sub| sub.id != id);
        }
    }

    /// Checks, after `added` was linked in, that no chain of subregion and
    /// alias steps loops or passes through more than [`MAX_DEPTH`] regions.
    ///
    /// The whole graph is checked, detached parts included, so that mapping
    /// an alias onto them later cannot be the first time a loop shows.
    fn check_graph(&self, added: RegionId) -> Result<()> {
        let mut marks = HashMap::with_capacity(self.regions.len());
        let mut deepest = 0;
        for &id in self.regions.keys() {
            let depth = self
                .chain_depth(id, &mut marks)
                .ok_or(Error::AddCycle(added))?;
            deepest = max(deepest, depth);
        }
        if deepest > MAX_DEPTH {
            return Err(Error::AddTooDeep {
                id: added,
                max: MAX_DEPTH,
            });
        }
        Ok(())
    }

    /// The number of regions on the longest chain starting at `id`, or
    /// `None` if a chain loops.
    ///
    /// The map was valid before the one region being checked was added, so
    /// any chain without a loop has at most `2 * MAX_DEPTH + 1` regions and
    /// the recursion stays shallow.
    fn chain_depth(&self, id: RegionId, marks: &mut HashMap<RegionId, Mark>) -> Option<usize> {
        match marks.get(&id) {
            Some(Mark::Done(depth)) => return Some(*depth),
            Some(Mark::Active) => return None,
            None => {}
        }
        // A missing alias target shows nothing and adds nothing to a chain.
        let Some(region) = self.regions.get(&id) else {
            return Some(0);
        };
        marks.insert(id, Mark::Active);
        let below = match &region.spec.kind {
            RegionKind::Leaf(_) => 0,
            RegionKind::Alias { target, .. } => self.chain_depth(*target, marks)?,
            RegionKind::Container => {
                let mut below = 0;
                for sub in &region.subregions {
                    below = max(below, self.chain_depth(sub.id, marks)?);
                }
                below
            }
        };
        let depth = below + 1;
        marks.insert(id, Mark::Done(depth));
        Some(depth)
    }

    /// Re-renders the flat view from the tree.
    fn rebuild(&mut self) {
        let mut render = Render {
            regions: &self.regions,
            pieces: BTreeMap::new(),
        };
        for sub in &self.root {
            render.region(sub.id, i128::from(sub.base), 0, SPACE_END);
        }
        let pieces = render.pieces;

        let mut flat: Vec<FlatRange<T>> = Vec::with_capacity(pieces.len());
        for (start, piece) in pieces {
            let start = to_u64(start);
            let len = to_u64(piece.end - i128::from(start));
            if let Some(last) = flat.last_mut() {
                let continues = last.region == piece.region
                    && u128::from(last.start.0) + u128::from(last.len) == u128::from(start)
                    && u128::from(last.offset.0) + u128::from(last.len) == u128::from(piece.offset);
                if continues {
                    // Both pieces lie inside one leaf, so the sum is at most
                    // the leaf's size.
                    last.len += len;
                    continue;
                }
            }
            let Some(target) = self.regions.get(&piece.region).and_then(Region::target) else {
                // Rendering only emits pieces for leaves present in the map.
                continue;
            };
            flat.push(FlatRange {
                start: BusAddr(start),
                len,
                region: piece.region,
                target: target.clone(),
                offset: RegionOffset(piece.offset),
            });
        }
        self.flat = flat;
    }
}

/// Converts a rendered coordinate known to lie in `[0, 2^64)`.
fn to_u64(value: i128) -> u64 {
    u64::try_from(value).expect("rendered ranges lie inside the 64-bit space and their leaves")
}

/// Progress of the loop and depth check on one region.
#[derive(Copy, Clone, Debug)]
enum Mark {
    /// On the current chain; meeting it again means a loop.
    Active,
    /// Finished: the longest chain from here has this many regions.
    Done(usize),
}

/// A piece of the flat view while rendering, keyed by its start.
#[derive(Copy, Clone, Debug)]
struct Piece {
    end: i128,
    region: RegionId,
    offset: u64,
}

/// Renders the tree into pieces.
///
/// Coordinates are `i128`: an alias can place its target's start below 0
/// or far above 2^64, and only the clipped window is ever kept.
struct Render<'m, T> {
    regions: &'m BTreeMap<RegionId, Region<T>>,
    pieces: BTreeMap<i128, Piece>,
}

impl<T> Render<'_, T> {
    /// Renders region `id`, whose offset 0 sits at `base`, into the window
    /// `[lo, hi)`. Space already claimed stays as it is, so regions must be
    /// rendered in falling precedence.
    fn region(&mut self, id: RegionId, base: i128, lo: i128, hi: i128) {
        let Some(region) = self.regions.get(&id) else {
            return;
        };
        let lo = max(lo, base);
        let hi = min(hi, base + i128::from(region.spec.size));
        if lo >= hi || self.covered(lo, hi) {
            return;
        }
        match &region.spec.kind {
            RegionKind::Leaf(_) => self.fill(id, base, lo, hi),
            RegionKind::Alias { target, offset } => {
                self.region(*target, base - i128::from(offset.0), lo, hi);
            }
            RegionKind::Container => {
                for sub in &region.subregions {
                    self.region(sub.id, base + i128::from(sub.base), lo, hi);
                }
            }
        }
    }

    /// Whether `[lo, hi)` is already fully claimed.
    fn covered(&self, lo: i128, hi: i128) -> bool {
        let mut cursor = lo;
        while cursor < hi {
            match self.pieces.range(..=cursor).next_back() {
                Some((_, piece)) if piece.end > cursor => cursor = piece.end,
                _ => return false,
            }
        }
        true
    }

    /// Claims the unclaimed parts of `[lo, hi)` for leaf `id` at `base`.
    fn fill(&mut self, id: RegionId, base: i128, lo: i128, hi: i128) {
        let mut cursor = lo;
        if let Some((_, piece)) = self.pieces.range(..=cursor).next_back() {
            cursor = max(cursor, piece.end);
        }
        while cursor < hi {
            let next = self
                .pieces
                .range(cursor..)
                .next()
                .map(|(start, piece)| (*start, piece.end));
            let gap_end = match next {
                Some((start, _)) => min(start, hi),
                None => hi,
            };
            if gap_end > cursor {
                let piece = Piece {
                    end: gap_end,
                    region: id,
                    offset: to_u64(cursor - base),
                };
                self.pieces.insert(cursor, piece);
            }
            cursor = match next {
                Some((start, end)) if start < hi => end,
                _ => hi,
            };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    type Map = RegionMap<u64>;

    fn leaf(size: u64, tag: u64) -> RegionSpec<u64> {
        RegionSpec {
            size,
            kind: RegionKind::Leaf(tag),
        }
    }

    fn alias(size: u64, target: u64, offset: u64) -> RegionSpec<u64> {
        RegionSpec {
            size,
            kind: RegionKind::Alias {
                target: RegionId(target),
                offset: RegionOffset(offset),
            },
        }
    }

    fn container(size: u64) -> RegionSpec<u64> {
        RegionSpec {
            size,
            kind: RegionKind::Container,
        }
    }

    fn root(base: u64, priority: i32) -> Placement {
        Placement::root(base, priority)
    }

    fn inside(parent: u64, base: u64, priority: i32) -> Placement {
        Placement::inside(RegionId(parent), base, priority)
    }

    /// (leaf id, offset) at `addr`.
    fn hit(map: &Map, addr: u64) -> Option<(u64, u64)> {
        map.resolve(BusAddr(addr)).map(|r| (r.region.0, r.offset.0))
    }

    #[test]
    fn test_higher_priority_overrides_lower() {
        let mut map = Map::new();
        map.add(RegionId(2), leaf(10, 2), root(20, 1)).unwrap();
        map.add(RegionId(1), leaf(100, 1), root(0, 0)).unwrap();
        assert_eq!(hit(&map, 19), Some((1, 19)));
        assert_eq!(hit(&map, 25), Some((2, 5)));
        assert_eq!(hit(&map, 30), Some((1, 30)));
        assert_eq!(hit(&map, 100), None);
    }

    #[test]
    fn test_equal_priority_later_add_wins() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(100, 1), root(0, 0)).unwrap();
        map.add(RegionId(2), leaf(10, 2), root(20, 0)).unwrap();
        map.add(RegionId(3), leaf(100, 3), root(50, 0)).unwrap();
        assert_eq!(hit(&map, 25), Some((2, 5)));
        assert_eq!(hit(&map, 45), Some((1, 45)));
        assert_eq!(hit(&map, 60), Some((3, 10)));
    }

    #[test]
    fn test_container_holes_show_lower_priority_through() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(100, 1), root(0, 0)).unwrap();
        map.add(RegionId(10), container(100), root(0, 1)).unwrap();
        map.add(RegionId(11), leaf(10, 11), inside(10, 10, 0))
            .unwrap();
        assert_eq!(hit(&map, 5), Some((1, 5)));
        assert_eq!(hit(&map, 15), Some((11, 5)));
        assert_eq!(hit(&map, 50), Some((1, 50)));
    }

    #[test]
    fn test_alias_into_leaf_with_offset() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(0x100, 1), root(0x1000, 0))
            .unwrap();
        map.add(RegionId(2), alias(0x10, 1, 0x20), root(0, 0))
            .unwrap();
        assert_eq!(hit(&map, 5), Some((1, 0x25)));
        assert_eq!(map.resolve(BusAddr(5)).unwrap().section_len, 0xb);
        assert_eq!(hit(&map, 0x10), None);
        // A window running past the end of its target is a hole there.
        map.add(RegionId(3), leaf(0x1000, 3), root(0x2000, -1))
            .unwrap();
        map.add(RegionId(4), alias(0x100, 1, 0xf0), root(0x2000, 0))
            .unwrap();
        assert_eq!(hit(&map, 0x200f), Some((1, 0xff)));
        assert_eq!(hit(&map, 0x2010), Some((3, 0x10)));
    }

    #[test]
    fn test_alias_into_container() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(1000, 1), root(0, -1)).unwrap();
        map.add(RegionId(10), container(100), Placement::Detached)
            .unwrap();
        map.add(RegionId(11), leaf(10, 11), inside(10, 10, 0))
            .unwrap();
        map.add(RegionId(12), leaf(10, 12), inside(10, 50, 0))
            .unwrap();
        map.add(RegionId(2), alias(100, 10, 5), root(200, 0))
            .unwrap();
        assert_eq!(hit(&map, 204), Some((1, 204)));
        assert_eq!(hit(&map, 205), Some((11, 0)));
        assert_eq!(hit(&map, 230), Some((1, 230)));
        assert_eq!(hit(&map, 250), Some((12, 5)));
        // The window ends where the container does (offset 5 + 95).
        assert_eq!(hit(&map, 296), Some((1, 296)));
    }

    #[test]
    fn test_alias_chain() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(100, 1), Placement::Detached)
            .unwrap();
        map.add(RegionId(2), alias(50, 1, 10), Placement::Detached)
            .unwrap();
        map.add(RegionId(3), alias(20, 2, 5), root(1000, 0))
            .unwrap();
        assert_eq!(hit(&map, 999), None);
        assert_eq!(hit(&map, 1000), Some((1, 15)));
        assert_eq!(hit(&map, 1019), Some((1, 34)));
        assert_eq!(hit(&map, 1020), None);
        assert_eq!(map.resolve(BusAddr(1000)).unwrap().section_len, 20);
    }

    #[test]
    fn test_alias_to_detached_region() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(0x40, 7), Placement::Detached)
            .unwrap();
        assert!(map.flat_view().is_empty());
        map.add(RegionId(2), alias(0x40, 1, 0), root(0x100, 0))
            .unwrap();
        let r = map.resolve(BusAddr(0x110)).unwrap();
        assert_eq!(
            (r.region, *r.target, r.offset),
            (RegionId(1), 7, RegionOffset(0x10))
        );
        assert_eq!(hit(&map, 0x10), None);
    }

    #[test]
    fn test_alias_whose_target_is_removed_becomes_hole() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(0x40, 7), Placement::Detached)
            .unwrap();
        map.add(RegionId(2), alias(0x40, 1, 0), root(0x100, 0))
            .unwrap();
        assert_eq!(map.remove(RegionId(1)).unwrap(), vec![(RegionId(1), 7)]);
        assert!(map.contains(RegionId(2)));
        assert_eq!(hit(&map, 0x110), None);
        // The alias names its target by id, so a new region 1 shows again.
        map.add(RegionId(1), leaf(0x40, 8), Placement::Detached)
            .unwrap();
        assert_eq!(hit(&map, 0x110), Some((1, 0x10)));
    }

    #[test]
    fn test_remove_container_removes_children_and_returns_targets() {
        let mut map = Map::new();
        map.add(RegionId(10), container(0x100), root(0, 0)).unwrap();
        map.add(RegionId(11), leaf(0x10, 11), inside(10, 0, 0))
            .unwrap();
        map.add(RegionId(12), container(0x80), inside(10, 0x40, 1))
            .unwrap();
        map.add(RegionId(13), leaf(0x10, 13), inside(12, 0, 0))
            .unwrap();
        map.add(RegionId(14), alias(0x10, 11, 0), inside(12, 0x20, 0))
            .unwrap();
        map.add(RegionId(1), leaf(0x10, 1), root(0x200, 0)).unwrap();
        let removed = map.remove(RegionId(10)).unwrap();
        assert_eq!(removed, vec![(RegionId(13), 13), (RegionId(11), 11)]);
        assert_eq!(map.len(), 1);
        for id in [10, 11, 12, 13, 14] {
            assert!(!map.contains(RegionId(id)), "region {id}");
        }
        assert_eq!(hit(&map, 0x40), None);
        assert_eq!(hit(&map, 0x200), Some((1, 0)));
        assert_eq!(map.leaves().collect::<Vec<_>>(), vec![(RegionId(1), &1)]);
    }

    #[test]
    fn test_subregion_clipped_to_parent() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(0x1000, 1), root(0, -1)).unwrap();
        map.add(RegionId(10), container(0x40), root(0x100, 0))
            .unwrap();
        map.add(RegionId(11), leaf(0x100, 11), inside(10, 0x30, 0))
            .unwrap();
        assert_eq!(hit(&map, 0x13f), Some((11, 0xf)));
        assert_eq!(map.resolve(BusAddr(0x130)).unwrap().section_len, 0x10);
        assert_eq!(hit(&map, 0x140), Some((1, 0x140)));
    }

    #[test]
    fn test_overflow_near_end_of_space_is_error_not_panic() {
        let mut map = Map::new();
        let err = map.add(RegionId(1), leaf(2, 1), root(u64::MAX, 0));
        assert_eq!(
            err,
            Err(Error::AddOverflow {
                id: RegionId(1),
                base: u64::MAX,
                size: 2
            })
        );
        assert!(map.add(RegionId(1), leaf(u64::MAX, 1), root(1, 0)).is_ok());
        assert_eq!(hit(&map, u64::MAX), Some((1, u64::MAX - 1)));
        let last = map.flat_view().last().unwrap();
        assert_eq!((last.len, last.last()), (u64::MAX, BusAddr(u64::MAX)));
        assert_eq!(map.resolve(BusAddr(u64::MAX)).unwrap().section_len, 1);
        // Nested bases and aliases with huge offsets are clipped, not wrapped.
        let half = u64::MAX / 2;
        map.add(RegionId(10), container(half + 1), root(half, 1))
            .unwrap();
        let err = map.add(RegionId(11), leaf(6, 11), inside(10, u64::MAX - 4, 0));
        assert!(matches!(err, Err(Error::AddOverflow { .. })));
        map.add(RegionId(11), leaf(5, 11), inside(10, u64::MAX - 4, 0))
            .unwrap();
        map.add(RegionId(12), alias(u64::MAX, 11, u64::MAX), root(0, 2))
            .unwrap();
        map.add(RegionId(14), leaf(u64::MAX, 14), Placement::Detached)
            .unwrap();
        map.add(RegionId(13), alias(8, 14, u64::MAX - 3), root(0x10, 2))
            .unwrap();
        assert_eq!(hit(&map, u64::MAX), Some((1, u64::MAX - 1)));
        assert_eq!(hit(&map, 0x10), Some((14, u64::MAX - 3)));
        assert_eq!(hit(&map, 0x12), Some((14, u64::MAX - 1)));
        assert_eq!(hit(&map, 0x13), Some((1, 0x12)));
    }

    #[test]
    fn test_cycle_rejected_and_map_unchanged() {
        let mut map = Map::new();
        map.add(RegionId(10), container(0x100), root(0, 0)).unwrap();
        map.add(RegionId(11), alias(0x10, 12, 0), inside(10, 0, 0))
            .unwrap();
        map.add(RegionId(1), leaf(0x10, 1), inside(10, 0x20, 0))
            .unwrap();
        let before = map.flat_view().to_vec();
        let err = map.add(RegionId(12), alias(0x100, 10, 0), root(0x200, 0));
        assert_eq!(err, Err(Error::AddCycle(RegionId(12))));
        assert!(!map.contains(RegionId(12)));
        assert_eq!(map.len(), 3);
        assert_eq!(map.flat_view(), before.as_slice());
        let self_loop = map.add(RegionId(20), alias(0x10, 20, 0), Placement::Detached);
        assert_eq!(self_loop, Err(Error::AddCycle(RegionId(20))));
        // The same region added where it closes no loop is fine.
        map.add(RegionId(12), leaf(0x10, 12), Placement::Detached)
            .unwrap();
        assert_eq!(hit(&map, 3), Some((12, 3)));
    }

    #[test]
    fn test_too_deep_rejected_and_map_unchanged() {
        let mut map = Map::new();
        map.add(RegionId(0), container(0x100), root(0, 0)).unwrap();
        for id in 1..MAX_DEPTH as u64 - 1 {
            map.add(RegionId(id), container(0x100), inside(id - 1, 0, 0))
                .unwrap();
        }
        let deepest = MAX_DEPTH as u64 - 2;
        map.add(RegionId(100), leaf(0x10, 100), inside(deepest, 0, 0))
            .unwrap();
        assert_eq!(hit(&map, 1), Some((100, 1)));
        let before = map.flat_view().to_vec();
        let err = map.add(RegionId(101), alias(0x10, 100, 0), inside(deepest, 0x10, 0));
        assert_eq!(
            err,
            Err(Error::AddTooDeep {
                id: RegionId(101),
                max: MAX_DEPTH
            })
        );
        assert_eq!(map.flat_view(), before.as_slice());
        assert!(!map.contains(RegionId(101)));
    }

    #[test]
    fn test_duplicate_id_rejected() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(0x10, 1), root(0, 0)).unwrap();
        let err = map.add(RegionId(1), leaf(0x10, 2), root(0x10, 5));
        assert_eq!(err, Err(Error::AddDuplicate(RegionId(1))));
        assert_eq!(err.unwrap_err().to_string(), "Region 1 already exists");
        assert_eq!(hit(&map, 0x10), None);
        assert_eq!(map.get(RegionId(1)).unwrap().target(), Some(&1));
    }

    #[test]
    fn test_invalid_adds_and_removes_rejected() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(0x10, 1), root(0, 0)).unwrap();
        assert_eq!(
            map.add(RegionId(2), leaf(0, 2), root(0, 0)),
            Err(Error::AddZeroSize(RegionId(2)))
        );
        assert_eq!(
            map.add(RegionId(2), leaf(1, 2), inside(9, 0, 0)),
            Err(Error::AddUnknownParent {
                id: RegionId(2),
                parent: RegionId(9)
            })
        );
        assert_eq!(
            map.add(RegionId(2), leaf(1, 2), inside(1, 0, 0)),
            Err(Error::AddParentNotContainer {
                id: RegionId(2),
                parent: RegionId(1)
            })
        );
        assert_eq!(
            map.remove(RegionId(2)),
            Err(Error::RemoveUnknown(RegionId(2)))
        );
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn test_section_len_across_adjacent_leaves() {
        let mut map = Map::new();
        map.add(RegionId(1), leaf(10, 1), root(0, 0)).unwrap();
        map.add(RegionId(2), leaf(10, 2), root(10, 0)).unwrap();
        assert_eq!(map.resolve(BusAddr(3)).unwrap().section_len, 7);
        assert_eq!(map.resolve(BusAddr(10)).unwrap().section_len, 10);
        assert_eq!(map.flat_view().len(), 2);
        // Two windows that continue the same leaf merge into one section.
        map.add(RegionId(3), leaf(100, 3), Placement::Detached)
            .unwrap();
        map.add(RegionId(4), alias(10, 3, 0), root(100, 0)).unwrap();
        map.add(RegionId(5), alias(10, 3, 10), root(110, 0))
            .unwrap();
        assert_eq!(map.resolve(BusAddr(102)).unwrap().section_len, 18);
        assert_eq!(map.flat_view().len(), 3);
    }

    /// An independent model: the same tree, resolved one address at a time
    /// by walking it, with no flat view.
    mod model {
        use super::*;

        #[derive(Clone, Debug)]
        pub struct Node {
            pub size: u64,
            pub kind: RegionKind<u64>,
            pub placement: Placement,
            pub added: u64,
        }

        #[derive(Clone, Debug, Default)]
        pub struct Model {
            pub nodes: HashMap<u64, Node>,
            clock: u64,
        }

        impl Model {
            /// Children of `parent`, in the order they win.
            fn children(&self, parent: Parent) -> Vec<(u64, u64)> {
                let mut kids: Vec<(i32, u64, u64, u64)> = self
                    .nodes
                    .iter()
                    .filter_map(|(&id, node)| match node.placement {
                        Placement::Mapped {
                            parent: p,
                            base,
                            priority,
                        } if p == parent => Some((priority, node.added, id, base)),
                        _ => None,
                    })
                    .collect();
                kids.sort_by_key(|kid| std::cmp::Reverse((kid.0, kid.1)));
                kids.into_iter()
                    .map(|(_, _, id, base)| (id, base))
                    .collect()
            }

            fn loops_or_too_deep(&self, id: u64, path: &mut Vec<u64>) -> bool {
                let Some(node) = self.nodes.get(&id) else {
                    return false;
                };
                if path.contains(&id) || path.len() == MAX_DEPTH {
                    return true;
                }
                path.push(id);
                let bad = match &node.kind {
                    RegionKind::Leaf(_) => false,
                    RegionKind::Alias { target, .. } => self.loops_or_too_deep(target.0, path),
                    RegionKind::Container => self
                        .children(Parent::Container(RegionId(id)))
                        .into_iter()
                        .any(|(kid, _)| self.loops_or_too_deep(kid, path)),
                };
                path.pop();
                bad
            }

            pub fn add(
                &mut self,
                id: u64,
                size: u64,
                kind: RegionKind<u64>,
                placement: Placement,
            ) -> bool {
                if self.nodes.contains_key(&id) || size == 0 {
                    return false;
                }
                if let Placement::Mapped { parent, base, .. } = placement {
                    if base as u128 + size as u128 > 1 << 64 {
                        return false;
                    }
                    if let Parent::Container(p) = parent {
                        match self.nodes.get(&p.0) {
                            Some(node) if matches!(node.kind, RegionKind::Container) => {}
                            _ => return false,
                        }
                    }
                }
                let mut next = self.clone();
                next.clock += 1;
                let added = next.clock;
                next.nodes.insert(
                    id,
                    Node {
                        size,
                        kind,
                        placement,
                        added,
                    },
                );
                let ids: Vec<u64> = next.nodes.keys().copied().collect();
                if ids
                    .iter()
                    .any(|&n| next.loops_or_too_deep(n, &mut Vec::new()))
                {
                    return false;
                }
                *self = next;
                true
            }

            pub fn remove(&mut self, id: u64) -> Option<Vec<u64>> {
                self.nodes.get(&id)?;
                let mut gone = vec![id];
                let mut i = 0;
                while i < gone.len() {
                    let kids = self.children(Parent::Container(RegionId(gone[i])));
                    gone.extend(kids.into_iter().map(|(kid, _)| kid));
                    i += 1;
                }
                let mut leaves = Vec::new();
                for g in gone {
                    if let Some(node) = self.nodes.remove(&g) {
                        if let RegionKind::Leaf(tag) = node.kind {
                            leaves.push(tag);
                        }
                    }
                }
                leaves.sort_unstable();
                Some(leaves)
            }

            /// `region` has its offset 0 at absolute `base`.
            fn walk(&self, id: u64, base: i128, addr: i128) -> Option<(u64, u64, u64)> {
                let node = self.nodes.get(&id)?;
                if addr < base || addr >= base + node.size as i128 {
                    return None;
                }
                match &node.kind {
                    RegionKind::Leaf(tag) => Some((id, (addr - base) as u64, *tag)),
                    RegionKind::Alias { target, offset } => {
                        self.walk(target.0, base - offset.0 as i128, addr)
                    }
                    RegionKind::Container => self
                        .children(Parent::Container(RegionId(id)))
                        .into_iter()
                        .find_map(|(kid, kb)| self.walk(kid, base + kb as i128, addr)),
                }
            }

            /// (leaf id, offset, target) at `addr`.
            pub fn resolve(&self, addr: u64) -> Option<(u64, u64, u64)> {
                self.children(Parent::Root)
                    .into_iter()
                    .find_map(|(kid, base)| self.walk(kid, base as i128, addr as i128))
            }
        }
    }

    mod prop {
        use super::model::Model;
        use super::*;
        use proptest::prelude::*;

        const IDS: u64 = 12;
        const SPAN: u64 = 400;

        #[derive(Clone, Debug)]
        enum Where {
            Detached,
            Root,
            /// The n-th existing container (modulo their count), else root.
            Existing(usize),
            /// Any id, which may be missing or not a container.
            Any(u64),
        }

        #[derive(Clone, Debug)]
        enum Target {
            /// The n-th existing region (modulo their count), else id 0.
            Existing(usize),
            /// Any id, which may be missing.
            Any(u64),
        }

        #[derive(Clone, Debug)]
        enum Offset {
            Raw(u64),
            /// Line the window up with the target when both sit in the same
            /// parent, so that the target's sections continue through it.
            Follow,
        }

        impl Offset {
            fn pick(&self, model: &Model, target: u64, alias_at: Placement) -> u64 {
                match (
                    self,
                    alias_at,
                    model.nodes.get(&target).map(|n| n.placement),
                ) {
                    (Offset::Raw(offset), _, _) => *offset,
                    (
                        Offset::Follow,
                        Placement::Mapped { parent, base, .. },
                        Some(Placement::Mapped {
                            parent: target_parent,
                            base: target_base,
                            ..
                        }),
                    ) if parent == target_parent => base.saturating_sub(target_base),
                    (Offset::Follow, _, _) => 0,
                }
            }
        }

        #[derive(Clone, Debug)]
        enum What {
            Leaf,
            Alias(Target, Offset),
            Container,
        }

        #[derive(Clone, Debug)]
        enum Op {
            Add {
                id: u64,
                what: What,
                size: u64,
                at: Where,
                base: u64,
                priority: i32,
            },
            Remove(u64),
        }

        /// In `[lo, hi)`; half the time a multiple of 16, so that alias
        /// windows line up with their targets and sections of a leaf meet.
        fn aligned(lo: u64, hi: u64) -> impl Strategy<Value = u64> {
            prop_oneof![
                lo..hi,
                (lo.div_ceil(16)..hi.div_ceil(16)).prop_map(|n| n * 16)
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            let target = prop_oneof![
                any::<usize>().prop_map(Target::Existing),
                (0..IDS).prop_map(Target::Any),
            ];
            let offset = prop_oneof![
                2 => aligned(0, 80).prop_map(Offset::Raw),
                1 => Just(Offset::Follow),
            ];
            let what = prop_oneof![
                3 => Just(What::Leaf),
                3 => (target, offset).prop_map(|(t, o)| What::Alias(t, o)),
                2 => Just(What::Container),
            ];
            let at = prop_oneof![
                1 => Just(Where::Detached),
                3 => Just(Where::Root),
                3 => any::<usize>().prop_map(Where::Existing),
                1 => (0..IDS).prop_map(Where::Any),
            ];
            prop_oneof![
                4 => (0..IDS, what, aligned(1, 64), at, aligned(0, 256), -2i32..=2).prop_map(
                    |(id, what, size, at, base, priority)| Op::Add {
                        id,
                        what,
                        size,
                        at,
                        base,
                        priority
                    }
                ),
                1 => (0..IDS).prop_map(Op::Remove),
            ]
        }

        fn apply(map: &mut Map, model: &mut Model, op: &Op, tag: u64) -> (bool, bool) {
            match op {
                Op::Add {
                    id,
                    what,
                    size,
                    at,
                    base,
                    priority,
                } => {
                    let parent = match at {
                        Where::Detached => None,
                        Where::Root => Some(Parent::Root),
                        Where::Existing(n) => {
                            let mut boxes: Vec<u64> = model
                                .nodes
                                .iter()
                                .filter(|(_, node)| matches!(node.kind, RegionKind::Container))
                                .map(|(&id, _)| id)
                                .collect();
                            boxes.sort_unstable();
                            Some(match boxes.get(n % boxes.len().max(1)) {
                                Some(&p) => Parent::Container(RegionId(p)),
                                None => Parent::Root,
                            })
                        }
                        Where::Any(p) => Some(Parent::Container(RegionId(*p))),
                    };
                    let placement = match parent {
                        None => Placement::Detached,
                        Some(parent) => Placement::Mapped {
                            parent,
                            base: *base,
                            priority: *priority,
                        },
                    };
                    let kind = match what {
                        What::Leaf => RegionKind::Leaf(tag),
                        What::Alias(target, offset) => {
                            let target = match target {
                                Target::Existing(n) => {
                                    let mut ids: Vec<u64> = model.nodes.keys().copied().collect();
                                    ids.sort_unstable();
                                    ids.get(n % ids.len().max(1)).copied().unwrap_or(0)
                                }
                                Target::Any(t) => *t,
                            };
                            RegionKind::Alias {
                                target: RegionId(target),
                                offset: RegionOffset(offset.pick(model, target, placement)),
                            }
                        }
                        What::Container => RegionKind::Container,
                    };
                    let spec = RegionSpec {
                        size: *size,
                        kind: kind.clone(),
                    };
                    let ok = map.add(RegionId(*id), spec, placement).is_ok();
                    (ok, model.add(*id, *size, kind, placement))
                }
                Op::Remove(id) => {
                    let got = map.remove(RegionId(*id)).ok().map(|leaves| {
                        let mut tags: Vec<u64> = leaves.into_iter().map(|(_, t)| t).collect();
                        tags.sort_unstable();
                        tags
                    });
                    let want = model.remove(*id);
                    assert_eq!(got, want, "removed targets of {id}");
                    (got.is_some(), want.is_some())
                }
            }
        }

        fn check(map: &Map, model: &Model) {
            let expected: Vec<Option<(u64, u64, u64)>> =
                (0..SPAN).map(|a| model.resolve(a)).collect();
            for addr in 0..300 {
                let got = map.resolve(BusAddr(addr));
                let want = expected[addr as usize];
                assert_eq!(
                    got.as_ref().map(|r| (r.region.0, r.offset.0, *r.target)),
                    want,
                    "address {addr}"
                );
                let (Some(got), Some((leaf, offset, _))) = (got, want) else {
                    continue;
                };
                let len = got.section_len;
                assert!(len >= 1);
                let end = addr + len;
                assert!(end < SPAN, "section at {addr} runs to {end}");
                for i in 0..len {
                    let at = expected[(addr + i) as usize].map(|(l, o, _)| (l, o));
                    assert_eq!(
                        at,
                        Some((leaf, offset + i)),
                        "section from {addr}, byte {i}"
                    );
                }
                let after = expected[end as usize].map(|(l, o, _)| (l, o));
                assert_ne!(
                    after,
                    Some((leaf, offset + len)),
                    "section from {addr} stops early"
                );
            }
            for pair in map.flat_view().windows(2) {
                let first_end = u128::from(pair[0].start.0) + u128::from(pair[0].len);
                assert!(first_end <= u128::from(pair[1].start.0), "{pair:?}");
            }
            assert_eq!(map.len(), model.nodes.len());
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn test_map_matches_tree_walking_model(ops in proptest::collection::vec(op(), 1..40)) {
                let mut map = Map::new();
                let mut model = Model::default();
                for (n, op) in ops.iter().enumerate() {
                    let before = map.flat_view().to_vec();
                    let (got, want) = apply(&mut map, &mut model, op, 1000 + n as u64);
                    prop_assert_eq!(got, want, "op {} {:?}", n, op);
                    if !got {
                        prop_assert_eq!(map.flat_view(), before.as_slice());
                    }
                    check(&map, &model);
                }
            }
        }
    }
}
