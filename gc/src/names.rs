//! Many short strings in one buffer: [`NameList`] keeps store path names (or full paths) end
//! to end in one `String` with a `u32` end offset each, instead of one heap allocation per
//! name. A 1,000,000-path store's names fit in about 50 MB this way instead of about 80 MB
//! of boxed strings.

/// An append-only list of strings stored end to end in one buffer.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NameList {
    bytes: String,
    ends: Vec<u32>,
}

impl NameList {
    /// An empty list with room for `n` names of about `avg` bytes.
    pub fn with_capacity(n: usize, avg: usize) -> Self {
        Self {
            bytes: String::with_capacity(n.saturating_mul(avg)),
            ends: Vec::with_capacity(n),
        }
    }

    /// Append a name. Panics if the list would hold more than 4 GiB of text (about 70 million
    /// store paths).
    pub fn push(&mut self, s: &str) {
        self.bytes.push_str(s);
        let end = u32::try_from(self.bytes.len()).expect("name list below 4 GiB");
        self.ends.push(end);
    }

    /// The `i`th name.
    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.bytes[start..self.ends[i] as usize]
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The names in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            list: self,
            front: 0,
            back: self.len(),
        }
    }

    /// Release spare capacity.
    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}

impl std::fmt::Debug for NameList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over the names of a [`NameList`].
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    list: &'a NameList,
    front: usize,
    back: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        (self.front < self.back).then(|| {
            self.front += 1;
            self.list.get(self.front - 1)
        })
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.back - self.front;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        (self.front < self.back).then(|| {
            self.back -= 1;
            self.list.get(self.back)
        })
    }
}

impl<'a> IntoIterator for &'a NameList {
    type Item = &'a str;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl<S: AsRef<str>> FromIterator<S> for NameList {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut l = Self::default();
        for s in iter {
            l.push(s.as_ref());
        }
        l
    }
}

impl serde::Serialize for NameList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_returns_names_in_order() {
        let mut l = NameList::with_capacity(2, 4);
        assert!(l.is_empty());
        l.push("abc");
        l.push("");
        l.push("de");
        assert_eq!(l.len(), 3);
        assert_eq!(l.get(0), "abc");
        assert_eq!(l.get(1), "");
        assert_eq!(l.get(2), "de");
        assert_eq!(l.iter().collect::<Vec<_>>(), vec!["abc", "", "de"]);
        assert_eq!((&l).into_iter().next_back(), Some("de"));
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"["abc","","de"]"#);
        assert_eq!(format!("{l:?}"), r#"["abc", "", "de"]"#);
        let m: NameList = ["abc", "", "de"].into_iter().collect();
        assert_eq!(m, l);
    }
}
