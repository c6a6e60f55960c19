//! Which source databases are synchronized, and where they land.

use std::collections::BTreeMap;

/// The databases to copy and their destination numbers.
///
/// By default every database is copied to the database of the same number.
/// `--db N` (repeatable) restricts the set; `--db-map SRC:DST` renames.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbFilter {
    /// `None`: every database.
    only: Option<Vec<u32>>,
    map: BTreeMap<u32, u32>,
}

impl DbFilter {
    pub fn new(only: Vec<u32>, map: BTreeMap<u32, u32>) -> DbFilter {
        let only = if only.is_empty() {
            // A mapping names its source databases; mapping without --db
            // still copies every other database unchanged.
            None
        } else {
            Some(only)
        };
        DbFilter { only, map }
    }

    /// Every database, unchanged.
    pub fn all() -> DbFilter {
        DbFilter::default()
    }

    /// The target database for source database `db`, or `None` when `db` is
    /// not synchronized.
    pub fn target_db(&self, db: u32) -> Option<u32> {
        if let Some(only) = &self.only {
            if !only.contains(&db) {
                return None;
            }
        }
        Some(self.map.get(&db).copied().unwrap_or(db))
    }

    /// The source databases explicitly selected (`None`: all).
    pub fn selected(&self) -> Option<&[u32]> {
        self.only.as_deref()
    }

    pub fn mapping(&self) -> &BTreeMap<u32, u32> {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_copies_everything_in_place() {
        let f = DbFilter::all();
        assert_eq!(f.target_db(0), Some(0));
        assert_eq!(f.target_db(15), Some(15));
    }

    #[test]
    fn selection_and_mapping() {
        let f = DbFilter::new(vec![0, 3], BTreeMap::from([(3, 0), (0, 5)]));
        assert_eq!(f.target_db(0), Some(5));
        assert_eq!(f.target_db(3), Some(0));
        assert_eq!(f.target_db(1), None);
        let f = DbFilter::new(vec![], BTreeMap::from([(2, 7)]));
        assert_eq!(f.target_db(2), Some(7));
        assert_eq!(f.target_db(1), Some(1));
    }
}
