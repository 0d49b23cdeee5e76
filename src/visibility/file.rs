//! Policy files: the table written as a list of allowed cells, in TOML or JSON.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::table::{HardRuleViolation, Revision, VisibilityPolicy};
use super::{DataClass, Party, Purpose, UnknownName};

/// The formats a policy file can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PolicyFormat {
    /// TOML (file names ending in `.toml`).
    Toml,
    /// JSON (file names ending in `.json`).
    Json,
}

impl fmt::Display for PolicyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Toml => "TOML",
            Self::Json => "JSON",
        })
    }
}

/// Why a policy could not be loaded or installed. Every variant about the
/// file's content names the field (`allow[2].purposes[1]`) or the cell.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The text is not valid TOML/JSON, or does not have the file's shape
    /// (missing or unknown field, wrong type). The message names the field.
    #[error("{format} policy file: {message}")]
    Syntax {
        /// The format being read.
        format: PolicyFormat,
        /// The parser's message.
        message: String,
    },
    /// A party, class or purpose name that does not exist.
    #[error("{field}: {source}")]
    UnknownName {
        /// Where the name is, such as `allow[0].party`.
        field: String,
        /// The name and the valid names.
        source: UnknownName,
    },
    /// An entry tries to allow a cell a hard rule forbids.
    #[error("{field}: {violation}")]
    HardRule {
        /// Where the purpose is, such as `allow[3].purposes[0]`.
        field: String,
        /// The offending cell and the rule it breaks.
        violation: HardRuleViolation,
    },
    /// Two entries for the same (party, class).
    #[error("{field}: a second entry for ({party}, {class}); the first is allow[{first}]")]
    DuplicateEntry {
        /// The later entry, such as `allow[4]`.
        field: String,
        /// The party.
        party: Party,
        /// The class.
        class: DataClass,
        /// The index of the first entry.
        first: usize,
    },
    /// A purpose listed twice in one entry.
    #[error("{field}: {purpose} is listed twice")]
    DuplicatePurpose {
        /// The second occurrence, such as `allow[1].purposes[2]`.
        field: String,
        /// The purpose.
        purpose: Purpose,
    },
    /// An entry with an empty purpose list (it would allow nothing).
    #[error("{field}: an entry must list at least one purpose")]
    NoPurposes {
        /// The list, such as `allow[1].purposes`.
        field: String,
    },
    /// The revision is 0 (reserved for the published table) or too large.
    #[error(
        "revision: a policy's revision must be 1 to 9223372036854775807 (0 is the published table), not {revision}"
    )]
    Revision {
        /// The revision given.
        revision: u64,
    },
    /// A replacement policy whose revision is not newer than the one in force.
    #[error(
        "revision: policy revision {offered} is not newer than the revision in force, {current}"
    )]
    StaleRevision {
        /// The revision in force.
        current: Revision,
        /// The revision offered.
        offered: Revision,
    },
    /// A file name that ends in neither `.toml` nor `.json`.
    #[error("{}: a policy file name must end in .toml or .json", path.display())]
    UnknownFormat {
        /// The path.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: Arc<std::io::Error>,
    },
    /// The audit trail could not record the policy, so it was not put in
    /// force.
    #[error("the policy could not be audited: {0}")]
    Unaudited(crate::visibility::AuditError),
}

/// A policy file as written: a revision and the list of allowed cells.
///
/// It is public so that a host can embed a policy in its own configuration
/// (any serde format) and compile it with [`PolicyFile::compile`]. Names are
/// kept as strings until compiled, so that every error can name its field.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The policy's revision, 1 to [`Revision::MAX`].
    pub revision: u64,
    /// Every allowed cell; anything not listed is denied.
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
}

/// One entry of a policy file: a (party, class) and the purposes allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// A [`Party`] name, such as `transport`.
    pub party: String,
    /// A [`DataClass`] name, such as `consumer_phone_number`.
    pub class: String,
    /// [`Purpose`] names, such as `["delivery", "integrity"]`.
    pub purposes: Vec<String>,
}

impl PolicyFile {
    /// The policy this file describes, starting from deny-all. One problem
    /// is reported, naming its field: a bad revision, wherever the file
    /// writes it, before any entry's; otherwise the first entry's problem in
    /// document order.
    pub fn compile(&self) -> Result<VisibilityPolicy, PolicyError> {
        let mut builder = VisibilityPolicy::builder(self.revision)?;
        let mut seen: Vec<(Party, DataClass, usize)> = Vec::new();
        for (i, entry) in self.allow.iter().enumerate() {
            let party: Party = parse_name(&entry.party, || format!("allow[{i}].party"))?;
            let class: DataClass = parse_name(&entry.class, || format!("allow[{i}].class"))?;
            if let Some(&(_, _, first)) = seen.iter().find(|s| s.0 == party && s.1 == class) {
                return Err(PolicyError::DuplicateEntry {
                    field: format!("allow[{i}]"),
                    party,
                    class,
                    first,
                });
            }
            seen.push((party, class, i));
            if entry.purposes.is_empty() {
                return Err(PolicyError::NoPurposes {
                    field: format!("allow[{i}].purposes"),
                });
            }
            let mut listed: Vec<Purpose> = Vec::with_capacity(entry.purposes.len());
            for (j, name) in entry.purposes.iter().enumerate() {
                let field = || format!("allow[{i}].purposes[{j}]");
                let purpose: Purpose = parse_name(name, field)?;
                if listed.contains(&purpose) {
                    return Err(PolicyError::DuplicatePurpose {
                        field: field(),
                        purpose,
                    });
                }
                listed.push(purpose);
                builder.allow(party, class, purpose).map_err(|violation| {
                    PolicyError::HardRule {
                        field: field(),
                        violation,
                    }
                })?;
            }
        }
        Ok(builder.build())
    }
}

/// `text` read as JSON, or where it went wrong (`allow[0].purposes`; none
/// at the top level or in the syntax) and why (with the line and column).
/// A leading byte-order mark, which some editors write, is skipped, as the
/// TOML reader skips it.
pub(crate) fn from_json_at<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, (Option<String>, serde_json::Error)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut json = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut json).map_err(named)?;
    json.end().map_err(|e| (None, e))?;
    Ok(value)
}

/// `text` read as TOML, or where it went wrong, as
/// [`from_json_at`] says (the error shows the line).
pub(crate) fn from_toml_at<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, (Option<String>, toml::de::Error)> {
    let toml = toml::Deserializer::parse(text).map_err(|e| (None, e))?;
    serde_path_to_error::deserialize(toml).map_err(named)
}

/// Where a file's shape went wrong (none at the top level), and why.
fn named<E>(e: serde_path_to_error::Error<E>) -> (Option<String>, E) {
    let field = e.path().to_string();
    ((field != ".").then_some(field), e.into_inner())
}

fn parse_name<T: std::str::FromStr<Err = UnknownName>>(
    name: &str,
    field: impl FnOnce() -> String,
) -> Result<T, PolicyError> {
    name.parse().map_err(|source| PolicyError::UnknownName {
        field: field(),
        source,
    })
}

impl VisibilityPolicy {
    /// The policy in a TOML policy file (see the module docs for the format).
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = from_toml_at(text).map_err(|(field, e)| PolicyError::Syntax {
            format: PolicyFormat::Toml,
            message: match field {
                Some(field) => format!("{field}: {e}"),
                None => e.to_string(),
            },
        })?;
        file.compile()
    }

    /// The policy in a JSON policy file (see the module docs for the format).
    /// A leading byte-order mark, which some editors write, is skipped, as
    /// the TOML reader skips it.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = from_json_at(text).map_err(|(field, e)| PolicyError::Syntax {
            format: PolicyFormat::Json,
            message: match field {
                Some(field) => format!("{field}: {e}"),
                None => e.to_string(),
            },
        })?;
        file.compile()
    }

    /// The policy in the file at `path`, read as TOML or JSON by its
    /// extension (`.toml`, `.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let format = match ext.as_deref() {
            Some("toml") => PolicyFormat::Toml,
            Some("json") => PolicyFormat::Json,
            _ => {
                return Err(PolicyError::UnknownFormat {
                    path: path.to_owned(),
                });
            }
        };
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Io {
            path: path.to_owned(),
            source: Arc::new(e),
        })?;
        match format {
            PolicyFormat::Toml => Self::from_toml(&text),
            PolicyFormat::Json => Self::from_json(&text),
        }
    }

    /// The policy as a file: every allowed cell, one entry per (party, class)
    /// in table order. The published table (revision 0) cannot be loaded
    /// back as it is: give it a revision with [`VisibilityPolicy::to_builder`].
    pub fn to_file(&self) -> PolicyFile {
        let mut allow = Vec::new();
        for &party in Party::ALL {
            for &class in DataClass::ALL {
                let purposes = self.purposes(party, class);
                if !purposes.is_empty() {
                    allow.push(AllowEntry {
                        party: party.as_str().to_owned(),
                        class: class.as_str().to_owned(),
                        purposes: purposes.iter().map(|p| p.as_str().to_owned()).collect(),
                    });
                }
            }
        }
        PolicyFile {
            revision: self.revision().get(),
            allow,
        }
    }

    /// The policy as a TOML policy file; [`VisibilityPolicy::from_toml`]
    /// reads it back to an equal policy.
    pub fn to_toml(&self) -> String {
        // Written by hand: every name is a fixed snake_case identifier, so
        // nothing needs escaping, and the output is stable for diffs.
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# custodian visibility policy: every allowed cell; anything not listed is denied."
        );
        let _ = writeln!(out, "revision = {}", self.revision());
        for (party, class, purposes) in self.entries() {
            let _ = write!(
                out,
                "\n[[allow]]\nparty = \"{party}\"\nclass = \"{class}\"\npurposes = ["
            );
            write_names(&mut out, purposes);
            out.push_str("]\n");
        }
        out
    }

    /// What the policy allows, in 64 hex digits: SHA-256 over its JSON
    /// policy file ([`to_json`](Self::to_json)), revision included. The
    /// audit trail names each policy put in force by it.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.to_json()))
    }

    /// The policy as a JSON policy file; [`VisibilityPolicy::from_json`]
    /// reads it back to an equal policy.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "{{\n  \"revision\": {},\n  \"allow\": [",
            self.revision()
        );
        for (i, (party, class, purposes)) in self.entries().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                out,
                "{sep}\n    {{\"party\": \"{party}\", \"class\": \"{class}\", \"purposes\": ["
            );
            write_names(&mut out, purposes);
            out.push_str("]}");
        }
        out.push_str("\n  ]\n}\n");
        out
    }

    fn entries(&self) -> impl Iterator<Item = (Party, DataClass, super::Purposes)> + '_ {
        Party::ALL.iter().flat_map(move |&party| {
            DataClass::ALL.iter().filter_map(move |&class| {
                let purposes = self.purposes(party, class);
                (!purposes.is_empty()).then_some((party, class, purposes))
            })
        })
    }
}

fn write_names(out: &mut String, purposes: super::Purposes) {
    for (i, p) in purposes.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "\"{p}\"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::visibility::HardRule;

    /// The digest tells tables apart even under one revision, and is the
    /// same for a table read back from its file.
    #[test]
    fn the_digest_names_what_a_table_allows() {
        let table = VisibilityPolicy::published().to_builder(2).unwrap().build();
        let mut looser = table.to_builder(2).unwrap();
        looser
            .allow(
                Party::RestOfCompany,
                DataClass::BusinessInformation,
                crate::visibility::Purpose::Integrity,
            )
            .unwrap();
        let looser = looser.build();
        assert_eq!(looser.revision(), table.revision());
        assert_ne!(looser.digest(), table.digest());
        let back = VisibilityPolicy::from_json(&table.to_json()).unwrap();
        assert_eq!(back.digest(), table.digest());
        assert_eq!(table.digest().len(), 64);
    }

    #[test]
    fn file_errors_name_the_field() {
        let text = "revision = 3\n[[allow]]\nparty = \"transport\"\nclass = \"billing\"\npurposes = [\"billing\", \"biling\"]\n";
        let err = VisibilityPolicy::from_toml(text).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("allow[0].purposes[1]: unknown purpose \"biling\""),
            "{err}"
        );
    }

    #[test]
    fn a_file_reaching_for_content_in_the_transport_names_the_cell() {
        let text = r#"{"revision": 4, "allow": [
            {"party": "processor", "class": "message_content", "purposes": ["delivery"]},
            {"party": "transport", "class": "message_content", "purposes": ["integrity"]}
        ]}"#;
        match VisibilityPolicy::from_json(text) {
            Err(PolicyError::HardRule { field, violation }) => {
                assert_eq!(field, "allow[1].purposes[0]");
                assert_eq!(violation.party, Party::Transport);
                assert_eq!(violation.class, DataClass::MessageContent);
                assert_eq!(violation.purpose, Purpose::Integrity);
                assert_eq!(
                    violation.rule,
                    HardRule::ContentStaysWithProcessorAndBusiness
                );
            }
            other => panic!("expected a hard-rule error, got {other:?}"),
        }
    }

    #[test]
    fn a_file_with_only_a_revision_denies_everything() {
        let p = VisibilityPolicy::from_toml("revision = 9").unwrap();
        assert_eq!(p.allowed_cells().count(), 0);
        assert_eq!(p.revision().get(), 9);
    }

    #[test]
    fn revision_zero_is_reserved_for_the_published_table() {
        assert!(matches!(
            VisibilityPolicy::from_toml("revision = 0"),
            Err(PolicyError::Revision { revision: 0 })
        ));
    }
}
