//! The in-memory ClickHouse of `fanout plugin test`: it keeps the rows a plugin inserts, per
//! `database.table`, acknowledges DDL, and answers SELECTs of columns or `count()` over those
//! rows (`WHERE` with `=`, `!=`, `<`, `>`, `IN`, `NOT IN`, `AND`, `OR`; `DISTINCT`; `FINAL`
//! and `FORMAT` accepted) in TabSeparated, so a plugin's lookups ("which keys are stored
//! already?") see what it wrote. Anything else is an error naming what it cannot answer.

use std::collections::BTreeMap;

use serde_json::Value as Json;
use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, ObjectNamePart, SelectItem, SetExpr, Statement, TableFactor,
};

/// Rows per `database.table`, in insertion order.
#[derive(Debug, Default)]
pub struct FakeClickHouse {
    tables: BTreeMap<(String, String), Vec<Json>>,
}

impl FakeClickHouse {
    /// Keeps the rows (each a JSON object); a row that is not one is an error, as ClickHouse
    /// refuses the insert.
    pub fn insert(&mut self, database: &str, table: &str, rows: &[String]) -> Result<(), String> {
        let mut parsed = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            match serde_json::from_str::<Json>(r) {
                Ok(v @ Json::Object(_)) => parsed.push(v),
                Ok(_) => return Err(format!("row {i} is not a JSON object")),
                Err(e) => return Err(format!("row {i} is not JSON: {e}")),
            }
        }
        self.tables
            .entry((database.to_string(), table.to_string()))
            .or_default()
            .extend(parsed);
        Ok(())
    }

    /// Rows stored per table.
    pub fn counts(&self) -> Vec<(String, String, usize)> {
        self.tables
            .iter()
            .map(|((d, t), rows)| (d.clone(), t.clone(), rows.len()))
            .collect()
    }

    /// Answers a statement: DDL is acknowledged (empty body), SELECTs are evaluated.
    pub fn execute(&mut self, sql: &str) -> Result<String, String> {
        let statement = super::super::clickhouse_sql::parse_one(sql)?;
        match &statement {
            Statement::CreateDatabase { .. } => Ok(String::new()),
            Statement::CreateTable(ct) => {
                if let Some((db, t)) = db_table(&ct.name.0) {
                    self.tables.entry((db, t)).or_default();
                }
                Ok(String::new())
            }
            Statement::Query(q) => self.select(q),
            other => Err(format!(
                "plugin test's ClickHouse answers CREATE and SELECT only, not `{}`",
                other.to_string().chars().take(60).collect::<String>()
            )),
        }
    }

    fn select(&self, q: &sqlparser::ast::Query) -> Result<String, String> {
        let unsupported =
            |what: &str| Err(format!("plugin test's ClickHouse cannot evaluate {what}"));
        let SetExpr::Select(sel) = q.body.as_ref() else {
            return unsupported("this query (only one plain SELECT)");
        };
        if sel.from.len() != 1 || !sel.from[0].joins.is_empty() {
            return unsupported("a SELECT without exactly one table, or with a JOIN");
        }
        if !matches!(&sel.group_by, sqlparser::ast::GroupByExpr::Expressions(e, _) if e.is_empty())
            || sel.having.is_some()
        {
            return unsupported("GROUP BY or HAVING");
        }
        let TableFactor::Table { name, .. } = &sel.from[0].relation else {
            return unsupported("a SELECT from something other than a table");
        };
        let key = db_table(&name.0)
            .ok_or_else(|| format!("table `{name}` must be written database.table"))?;
        let empty = Vec::new();
        let rows = self.tables.get(&key).unwrap_or(&empty);
        let mut matching = Vec::new();
        for row in rows {
            let keep = match &sel.selection {
                None => true,
                Some(e) => truthy(&eval(e, row)?),
            };
            if keep {
                matching.push(row);
            }
        }
        let mut lines: Vec<String> = Vec::new();
        let aggregate = sel.projection.iter().any(|item| {
            matches!(
                item,
                SelectItem::UnnamedExpr(Expr::Function(_))
                    | SelectItem::ExprWithAlias {
                        expr: Expr::Function(_),
                        ..
                    }
            )
        });
        if aggregate {
            let mut cells = Vec::new();
            for item in &sel.projection {
                let expr = match item {
                    SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                    _ => return unsupported("`*` beside an aggregate"),
                };
                match expr {
                    Expr::Function(f) if f.name.to_string().eq_ignore_ascii_case("count") => {
                        cells.push(matching.len().to_string())
                    }
                    other => return unsupported(&format!("`{other}` (aggregates: count() only)")),
                }
            }
            lines.push(cells.join("\t"));
        } else {
            for row in matching {
                let mut cells = Vec::new();
                for item in &sel.projection {
                    match item {
                        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                            cells.push(tsv(&eval(e, row)?))
                        }
                        SelectItem::Wildcard(_) => {
                            if let Json::Object(m) = row {
                                cells.extend(m.values().map(tsv));
                            }
                        }
                        other => return unsupported(&format!("`{other}`")),
                    }
                }
                lines.push(cells.join("\t"));
            }
            if sel.distinct.is_some() {
                let mut seen = std::collections::HashSet::new();
                lines.retain(|l| seen.insert(l.clone()));
            }
        }
        Ok(lines.iter().map(|l| format!("{l}\n")).collect())
    }
}

fn db_table(parts: &[ObjectNamePart]) -> Option<(String, String)> {
    match parts {
        [ObjectNamePart::Identifier(db), ObjectNamePart::Identifier(t)] => {
            Some((db.value.clone(), t.value.clone()))
        }
        _ => None,
    }
}

/// A value as TabSeparated prints it.
fn tsv(v: &Json) -> String {
    match v {
        Json::Null => "\\N".into(),
        Json::String(s) => s
            .replace('\\', "\\\\")
            .replace('\t', "\\t")
            .replace('\n', "\\n"),
        Json::Bool(b) => u8::from(*b).to_string(),
        other => other.to_string(),
    }
}

fn truthy(v: &Json) -> bool {
    match v {
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        _ => false,
    }
}

/// Compares a column's value with a literal: numbers as numbers, the rest as text.
fn same(a: &Json, b: &Json) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => match (a, b) {
            (Json::String(x), Json::String(y)) => x == y,
            _ => a == b,
        },
    }
}

fn order(a: &Json, b: &Json) -> Option<std::cmp::Ordering> {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x.partial_cmp(&y),
        _ => match (a, b) {
            (Json::String(x), Json::String(y)) => Some(x.cmp(y)),
            _ => None,
        },
    }
}

fn eval(e: &Expr, row: &Json) -> Result<Json, String> {
    Ok(match e {
        Expr::Identifier(id) => row.get(&id.value).cloned().unwrap_or(Json::Null),
        Expr::CompoundIdentifier(parts) => parts
            .last()
            .and_then(|id| row.get(&id.value))
            .cloned()
            .unwrap_or(Json::Null),
        Expr::Nested(inner) => eval(inner, row)?,
        Expr::Value(v) => literal(&v.to_string()),
        Expr::UnaryOp { op, expr } if op.to_string() == "-" => match eval(expr, row)?.as_f64() {
            Some(f) => serde_json::json!(-f),
            None => Json::Null,
        },
        Expr::In {
            expr,
            target: InTarget::List(list),
            negated,
            ..
        } => {
            let v = eval(expr, row)?;
            let mut found = false;
            for item in list {
                if same(&v, &eval(item, row)?) {
                    found = true;
                    break;
                }
            }
            Json::Bool(found != *negated)
        }
        Expr::BinaryOp { left, op, right } => {
            let (l, r) = (eval(left, row)?, eval(right, row)?);
            use std::cmp::Ordering::*;
            Json::Bool(match op {
                BinaryOperator::And => truthy(&l) && truthy(&r),
                BinaryOperator::Or => truthy(&l) || truthy(&r),
                BinaryOperator::Eq => same(&l, &r),
                BinaryOperator::NotEq => !same(&l, &r),
                BinaryOperator::Lt => order(&l, &r) == Some(Less),
                BinaryOperator::LtEq => matches!(order(&l, &r), Some(Less | Equal)),
                BinaryOperator::Gt => order(&l, &r) == Some(Greater),
                BinaryOperator::GtEq => matches!(order(&l, &r), Some(Greater | Equal)),
                other => {
                    return Err(format!(
                        "plugin test's ClickHouse cannot evaluate `{other}`"
                    ))
                }
            })
        }
        other => {
            return Err(format!(
                "plugin test's ClickHouse cannot evaluate `{other}`"
            ))
        }
    })
}

/// A SQL literal's text as JSON: quoted strings, numbers, NULL.
fn literal(text: &str) -> Json {
    if let Some(s) = text.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return Json::String(s.replace("''", "'").replace("\\'", "'"));
    }
    if text.eq_ignore_ascii_case("null") {
        return Json::Null;
    }
    serde_json::from_str::<Json>(text).unwrap_or_else(|_| Json::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_see_the_rows_inserted() {
        let mut ch = FakeClickHouse::default();
        ch.execute("CREATE DATABASE IF NOT EXISTS d").unwrap();
        ch.insert(
            "d",
            "t",
            &[
                r#"{"event_id":1,"device":"web"}"#.into(),
                r#"{"event_id":2,"device":null}"#.into(),
            ],
        )
        .unwrap();
        assert_eq!(
            ch.execute(
                "SELECT DISTINCT event_id FROM d.t WHERE event_id IN (2,3) FORMAT TabSeparated"
            )
            .unwrap(),
            "2\n"
        );
        assert_eq!(
            ch.execute(
                "SELECT `event_id` FROM `d`.`t` WHERE `event_id` IN (1,2,3) FORMAT TabSeparated"
            )
            .unwrap(),
            "1\n2\n"
        );
        assert_eq!(ch.execute("SELECT count() FROM d.t FINAL").unwrap(), "2\n");
        assert_eq!(
            ch.execute("SELECT device FROM d.t WHERE event_id = 2")
                .unwrap(),
            "\\N\n"
        );
        assert!(ch.execute("SELECT avg(event_id) FROM d.t").is_err());
        assert!(ch.insert("d", "t", &["[1]".into()]).is_err());
    }
}
