//! Row filters of subscriptions: a small SQL-like boolean language over a record's fields, e.g.
//! `province_code = '79' AND current.commune_code IN ('26734', '26737')`.
//!
//! Grammar (keywords in any case):
//! ```text
//! expr    := and ("OR" and)*
//! and     := not ("AND" not)*
//! not     := "NOT" not | primary
//! primary := "(" expr ")" | field cmp literal | field "IN" "(" literal ("," literal)* ")"
//!          | field "IS" ["NOT"] "NULL"
//! cmp     := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
//! literal := 'text' ('' escapes a quote) | number | TRUE | FALSE
//! field   := name ("." name)*
//! ```
//! Values compare as numbers when both sides parse as numbers, otherwise as text; a comparison with
//! a missing or NULL field is false (as in SQL, `IS NULL` is how to ask for one).

use std::fmt;

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Both hold.
    And(Box<Filter>, Box<Filter>),
    /// Either holds.
    Or(Box<Filter>, Box<Filter>),
    /// Does not hold.
    Not(Box<Filter>),
    /// `field op literal`.
    Compare {
        /// Dotted field path.
        field: String,
        /// Comparison.
        op: CompareOp,
        /// Right-hand side.
        value: Literal,
    },
    /// `field IN (...)`.
    In {
        /// Dotted field path.
        field: String,
        /// Accepted values.
        values: Vec<Literal>,
    },
    /// `field IS [NOT] NULL`.
    IsNull {
        /// Dotted field path.
        field: String,
        /// `IS NOT NULL`.
        negated: bool,
    },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// `=`.
    Eq,
    /// `!=` or `<>`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

/// A literal in a filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `'text'`.
    Text(String),
    /// A number, kept as written.
    Number(String),
    /// `TRUE` / `FALSE`.
    Bool(bool),
}

/// A field's value as a record gives it to the filter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    /// NULL or absent.
    Null,
    /// Text, numbers as text.
    Text(&'a str),
    /// A number.
    Number(f64),
    /// A boolean.
    Bool(bool),
}

/// The filter does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter does not parse at character {at}: {message}")]
pub struct FilterError {
    /// 0-based character offset.
    pub at: usize,
    /// What was expected.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, FilterError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let token = match c {
            '(' => {
                i += 1;
                Token::LParen
            }
            ')' => {
                i += 1;
                Token::RParen
            }
            ',' => {
                i += 1;
                Token::Comma
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(FilterError { at: start, message: "unterminated text literal".into() }),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                Token::Str(s)
            }
            '=' => {
                i += 1;
                Token::Op("=")
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                i += 2;
                Token::Op("!=")
            }
            '<' | '>' => {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let op = match two.as_str() {
                    "<=" => "<=",
                    ">=" => ">=",
                    "<>" => "<>",
                    _ if c == '<' => "<",
                    _ => ">",
                };
                i += op.len();
                Token::Op(op)
            }
            c if c.is_ascii_digit() || c == '-' || c == '+' => {
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.' || chars[i] == 'e') {
                    i += 1;
                }
                let n: String = chars[start..i].iter().collect();
                if n.parse::<f64>().is_err() {
                    return Err(FilterError { at: start, message: format!("{n:?} is not a number") });
                }
                Token::Num(n)
            }
            c if c.is_alphabetic() || c == '_' => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
                    i += 1;
                }
                Token::Ident(chars[start..i].iter().collect())
            }
            other => return Err(FilterError { at: start, message: format!("unexpected character {other:?}") }),
        };
        out.push((start, token));
    }
    Ok(out)
}

/// Longest filter text: a subscription's filter is a few conditions, and the text arrives from the
/// admin API, whose caller may be wrong or hostile.
pub const MAX_FILTER_BYTES: usize = 4096;
/// Deepest nesting of parentheses and NOT: the parser and the evaluator recurse once per level, so
/// this bounds their stack (10 000 nested parentheses overflowed a worker's stack before it).
pub const MAX_FILTER_DEPTH: usize = 32;
/// Most comparisons in one filter: AND/OR chains nest one level per term when evaluated.
pub const MAX_FILTER_TERMS: usize = 256;

struct Parser {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    end: usize,
    depth: usize,
    terms: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(a, _)| *a)
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError { at: self.at(), message: message.into() })
    }

    fn keyword(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Token::Ident(w)) if w.eq_ignore_ascii_case(word)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.not()?;
        while self.keyword("and") {
            left = Filter::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn enter(&mut self) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_FILTER_DEPTH {
            return self.fail(format!("parentheses and NOT nest deeper than {MAX_FILTER_DEPTH}"));
        }
        Ok(())
    }

    fn not(&mut self) -> Result<Filter, FilterError> {
        if self.keyword("not") {
            self.enter()?;
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Filter::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Filter, FilterError> {
        if self.peek() == Some(&Token::LParen) {
            self.pos += 1;
            self.enter()?;
            let inner = self.expr()?;
            self.depth -= 1;
            if self.peek() != Some(&Token::RParen) {
                return self.fail("expected )");
            }
            self.pos += 1;
            return Ok(inner);
        }
        self.terms += 1;
        if self.terms > MAX_FILTER_TERMS {
            return self.fail(format!("more than {MAX_FILTER_TERMS} conditions"));
        }
        let field = match self.peek() {
            Some(Token::Ident(name))
                if !["and", "or", "not", "in", "is", "null", "true", "false"]
                    .iter()
                    .any(|k| name.eq_ignore_ascii_case(k)) =>
            {
                name.clone()
            }
            _ => return self.fail("expected a field name"),
        };
        if field.starts_with('.') || field.ends_with('.') || field.contains("..") {
            return self.fail(format!("{field:?} is not a field path"));
        }
        self.pos += 1;
        if self.keyword("is") {
            let negated = self.keyword("not");
            if !self.keyword("null") {
                return self.fail("expected NULL after IS");
            }
            return Ok(Filter::IsNull { field, negated });
        }
        if self.keyword("in") {
            if self.peek() != Some(&Token::LParen) {
                return self.fail("expected ( after IN");
            }
            self.pos += 1;
            let mut values = vec![self.literal()?];
            while self.peek() == Some(&Token::Comma) {
                self.pos += 1;
                values.push(self.literal()?);
            }
            if self.peek() != Some(&Token::RParen) {
                return self.fail("expected , or ) in the IN list");
            }
            self.pos += 1;
            return Ok(Filter::In { field, values });
        }
        let op = match self.peek() {
            Some(Token::Op(o)) => match *o {
                "=" => CompareOp::Eq,
                "!=" | "<>" => CompareOp::Ne,
                "<" => CompareOp::Lt,
                "<=" => CompareOp::Le,
                ">" => CompareOp::Gt,
                _ => CompareOp::Ge,
            },
            _ => return self.fail(format!("expected a comparison, IN or IS after {field}")),
        };
        self.pos += 1;
        let value = self.literal()?;
        Ok(Filter::Compare { field, op, value })
    }

    fn literal(&mut self) -> Result<Literal, FilterError> {
        let lit = match self.peek() {
            Some(Token::Str(s)) => Literal::Text(s.clone()),
            Some(Token::Num(n)) => Literal::Number(n.clone()),
            Some(Token::Ident(w)) if w.eq_ignore_ascii_case("true") => Literal::Bool(true),
            Some(Token::Ident(w)) if w.eq_ignore_ascii_case("false") => Literal::Bool(false),
            _ => return self.fail("expected a 'quoted text', a number, TRUE or FALSE"),
        };
        self.pos += 1;
        Ok(lit)
    }
}

impl Filter {
    /// Parses a filter.
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        if text.len() > MAX_FILTER_BYTES {
            return Err(FilterError { at: 0, message: format!("the filter is longer than {MAX_FILTER_BYTES} bytes") });
        }
        let tokens = tokenize(text)?;
        let mut p = Parser { tokens, pos: 0, end: text.chars().count(), depth: 0, terms: 0 };
        if p.peek().is_none() {
            return p.fail("the filter is empty");
        }
        let f = p.expr()?;
        if p.peek().is_some() {
            return p.fail("expected AND, OR or the end of the filter");
        }
        Ok(f)
    }

    /// Every field the filter reads.
    pub fn fields(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_fields(&mut out);
        out
    }

    fn collect_fields<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.collect_fields(out);
                b.collect_fields(out);
            }
            Filter::Not(a) => a.collect_fields(out),
            Filter::Compare { field, .. } | Filter::In { field, .. } | Filter::IsNull { field, .. } => out.push(field),
        }
    }

    /// Whether a record passes; `get` gives a field's value by its dotted path.
    pub fn matches<'a>(&self, get: &impl Fn(&str) -> FieldValue<'a>) -> bool {
        match self {
            Filter::And(a, b) => a.matches(get) && b.matches(get),
            Filter::Or(a, b) => a.matches(get) || b.matches(get),
            Filter::Not(a) => !a.matches(get),
            Filter::IsNull { field, negated } => (get(field) == FieldValue::Null) != *negated,
            Filter::In { field, values } => {
                let v = get(field);
                values.iter().any(|l| compare(v, l) == Some(std::cmp::Ordering::Equal))
            }
            Filter::Compare { field, op, value } => {
                let Some(ord) = compare(get(field), value) else { return false };
                match op {
                    CompareOp::Eq => ord.is_eq(),
                    CompareOp::Ne => ord.is_ne(),
                    CompareOp::Lt => ord.is_lt(),
                    CompareOp::Le => ord.is_le(),
                    CompareOp::Gt => ord.is_gt(),
                    CompareOp::Ge => ord.is_ge(),
                }
            }
        }
    }
}

fn compare(v: FieldValue<'_>, lit: &Literal) -> Option<std::cmp::Ordering> {
    let text = match v {
        FieldValue::Null => return None,
        FieldValue::Bool(b) => {
            return match lit {
                Literal::Bool(l) => Some(b.cmp(l)),
                _ => None,
            }
        }
        FieldValue::Number(x) => {
            return match lit {
                Literal::Number(n) => n.parse::<f64>().ok().and_then(|n| x.partial_cmp(&n)),
                _ => None,
            }
        }
        FieldValue::Text(t) => t,
    };
    match lit {
        Literal::Bool(_) => None,
        Literal::Number(n) => match (text.parse::<f64>(), n.parse::<f64>()) {
            (Ok(a), Ok(b)) => a.partial_cmp(&b),
            _ => Some(text.cmp(n.as_str())),
        },
        Literal::Text(s) => Some(text.cmp(s.as_str())),
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Literal::Number(n) => f.write_str(n),
            Literal::Bool(b) => write!(f, "{}", if *b { "TRUE" } else { "FALSE" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(pairs: &'a [(&'a str, FieldValue<'a>)]) -> impl Fn(&str) -> FieldValue<'a> + 'a {
        move |f| pairs.iter().find(|(k, _)| *k == f).map_or(FieldValue::Null, |(_, v)| *v)
    }

    #[test]
    fn deep_long_and_wide_filters_are_refused_before_they_cost_a_stack() {
        let deep = format!("{}a = 1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(Filter::parse(&deep).unwrap_err().to_string().contains("longer than"));
        let nested = format!("{}a = 1{}", "(".repeat(40), ")".repeat(40));
        assert!(Filter::parse(&nested).unwrap_err().to_string().contains("nest deeper"));
        let nots = format!("{}a = 1", "NOT ".repeat(40));
        assert!(Filter::parse(&nots).unwrap_err().to_string().contains("nest deeper"));
        let wide = vec!["a = 1"; 300].join(" OR ");
        assert!(Filter::parse(&wide).unwrap_err().to_string().contains("more than 256 conditions"));
        let fine = format!("{}a = 1{} AND b = 'x'", "(".repeat(30), ")".repeat(30));
        assert!(Filter::parse(&fine).is_ok());
    }

    #[test]
    fn filters_parse_and_evaluate_like_sql() {
        let r = [
            ("province_code", FieldValue::Text("79")),
            ("current.commune_code", FieldValue::Text("26734")),
            ("age", FieldValue::Number(42.0)),
            ("active", FieldValue::Bool(true)),
        ];
        let get = record(&r);
        let yes = [
            "province_code = '79'",
            "province_code = '79' AND current.commune_code IN ('26737', '26734')",
            "province_code <> '01' and not (age < 18)",
            "age >= 42 OR province_code = '01'",
            "note IS NULL AND age IS NOT NULL",
            "active = TRUE",
            "age > 9",
        ];
        for f in yes {
            assert!(Filter::parse(f).unwrap().matches(&get), "{f}");
        }
        let no = ["province_code = '01'", "note = 'x'", "note != 'x'", "age < 42", "active = false", "age > 100"];
        for f in no {
            assert!(!Filter::parse(f).unwrap().matches(&get), "{f}");
        }
        let f = Filter::parse("a = 'it''s' OR (b.c IN (1, 2) AND d IS NULL)").unwrap();
        assert_eq!(f.fields(), vec!["a", "b.c", "d"]);
    }

    #[test]
    fn bad_filters_say_where_and_what() {
        for (text, at, says) in [
            ("province_code = ", 16, "expected a 'quoted text'"),
            ("province_code == '79'", 15, "expected a 'quoted text'"),
            ("province_code = '79", 16, "unterminated"),
            ("= '79'", 0, "expected a field name"),
            ("a = 1 b = 2", 6, "expected AND, OR"),
            ("(a = 1", 6, "expected )"),
            ("a IN ('x' 'y')", 10, "expected , or )"),
            ("a ~ 'x'", 2, "unexpected character"),
            ("", 0, "empty"),
            ("a IS 'x'", 5, "expected NULL"),
        ] {
            let e = Filter::parse(text).unwrap_err();
            assert_eq!(e.at, at, "{text}: {e}");
            assert!(e.message.contains(says), "{text}: {e}");
        }
    }
}
