//! A provincial population table with real administrative-unit codes and Vietnamese names, and the
//! workloads the scenarios write into it.

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

/// The citizens table: every type the Postgres source must carry (plus a user-defined enum and an
/// interval, which travel as text with their type names), a TOAST-able note and a 12-digit id.
pub const CITIZENS_DDL: &str = "
CREATE TYPE citizen_status AS ENUM ('active', 'abroad', 'deceased');
CREATE TABLE citizens (
    citizen_id     char(12) PRIMARY KEY,
    full_name      text NOT NULL,
    birth_date     date,
    gender         smallint,
    province_code  varchar(2),
    commune_code   varchar(5),
    address        text,
    residence_kind text,
    registered_at  timestamp,
    updated_at     timestamptz DEFAULT now(),
    household_id   uuid,
    income         numeric(14,2),
    score          double precision,
    active         boolean,
    photo          bytea,
    profile        jsonb,
    tags           text[],
    phones         bigint[],
    note           text,
    status         citizen_status DEFAULT 'active',
    resident_for   interval DEFAULT '3 years 2 mons 5 days',
    version        bigint NOT NULL DEFAULT 1
);";

/// A commune after the 2025 reform: (province code, commune code, commune name, province name).
#[derive(Debug, Clone)]
pub struct Commune {
    /// 2-digit province code.
    pub province: String,
    /// 5-digit commune code.
    pub code: String,
    /// Commune name with diacritics.
    pub name: String,
    /// Province name with diacritics.
    pub province_name: String,
}

/// The real 2025 commune list from `../shared/data/admin-units/communes_2025.csv`.
pub fn communes() -> &'static [Commune] {
    static LIST: OnceLock<Vec<Commune>> = OnceLock::new();
    LIST.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/admin-units/communes_2025.csv");
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {path}: {e}; shared/ must sit beside the repo"));
        text.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.len() >= 4).then(|| Commune {
                    province: f[0].into(),
                    province_name: f[1].into(),
                    code: f[2].into(),
                    name: f[3].into(),
                })
            })
            .collect()
    })
}

const FAMILY: &[&str] = &[
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi", "Đỗ", "Hồ", "Ngô", "Dương",
    "Lý",
];
const MIDDLE: &[&str] = &["Văn", "Thị", "Hữu", "Đức", "Ngọc", "Minh", "Thanh", "Quốc", "Gia", "Bảo"];
const GIVEN: &[&str] = &[
    "An", "Bình", "Châu", "Dũng", "Giang", "Hà", "Hùng", "Khánh", "Linh", "Mai", "Nam", "Phương", "Quân", "Thảo",
    "Trang", "Tuấn", "Vy", "Yến",
];
const STREETS: &[&str] = &["Lê Lợi", "Trần Hưng Đạo", "Nguyễn Huệ", "Hai Bà Trưng", "Lý Thường Kiệt", "Điện Biên Phủ"];

/// Deterministic generator of citizens.
pub struct CitizenGen {
    rng: StdRng,
    n: u64,
}

impl CitizenGen {
    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), n: 0 }
    }

    /// A unique 12-digit citizen id: old province of birth registration, century+gender, year, serial.
    pub fn citizen_id(&mut self) -> String {
        self.n += 1;
        let province = self.rng.gen_range(1..=96);
        let gender = self.rng.gen_range(0..=3);
        let year = self.rng.gen_range(0..=99);
        format!("{province:03}{gender}{year:02}{:06}", self.n % 1_000_000)
    }

    /// A random commune.
    pub fn commune(&mut self) -> &'static Commune {
        let list = communes();
        &list[self.rng.gen_range(0..list.len())]
    }

    /// An address in `commune`.
    pub fn address(&mut self, c: &Commune) -> String {
        format!(
            "Số {} {}, {}, {}",
            self.rng.gen_range(1..400),
            STREETS[self.rng.gen_range(0..STREETS.len())],
            c.name,
            c.province_name
        )
    }

    /// A full name.
    pub fn name(&mut self) -> String {
        format!(
            "{} {} {}",
            FAMILY[self.rng.gen_range(0..FAMILY.len())],
            MIDDLE[self.rng.gen_range(0..MIDDLE.len())],
            GIVEN[self.rng.gen_range(0..GIVEN.len())]
        )
    }

    /// A random value in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.gen_range(0..n)
    }
}

/// Inserts `n` citizens in one statement; returns their ids.
pub async fn insert_citizens(client: &Client, gen: &mut CitizenGen, n: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(1000) {
        let count = (n - chunk * 1000).min(1000);
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let id = gen.citizen_id();
            let c = gen.commune();
            let addr = gen.address(c).replace('\'', "''");
            let name = gen.name();
            let i = gen.below(1_000_000);
            values.push(format!(
                "('{id}', '{name}', DATE '1950-01-01' + {d}, {g}, '{p}', '{code}', '{addr}', 'thường trú', \
                 TIMESTAMP '2020-01-01 08:00:00' + interval '{i} seconds', '{u}'::uuid, {inc}.{cents:02}, {score}, {act}, \
                 '\\x{photo:08x}'::bytea, '{{\"ethnic\": \"Kinh\", \"note\": \"tiếng Việt\", \"n\": {i}}}', \
                 ARRAY['dân tộc Kinh', {tag}], ARRAY[{i}, NULL]::bigint[], {note})",
                d = i % 20000,
                g = i % 2,
                p = c.province,
                code = c.code,
                u = format_args!("00000000-0000-4000-8000-{i:012}"),
                inc = i % 100000,
                cents = i % 100,
                score = (i as f64) / 7.0,
                act = !i.is_multiple_of(3),
                photo = i,
                tag = if i.is_multiple_of(5) { "NULL".to_string() } else { format!("'nhóm \"{}\"'", i % 7) },
                note = if i.is_multiple_of(11) { "NULL".to_string() } else { format!("'ghi chú {i}'") },
            ));
            ids.push(id);
        }
        client.batch_execute(&format!("INSERT INTO citizens (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind, registered_at, household_id, income, score, active, photo, profile, tags, phones, note) VALUES {}", values.join(", "))).await?;
    }
    Ok(ids)
}

/// Moves one citizen to a random commune (a residence change).
pub async fn move_citizen(client: &Client, gen: &mut CitizenGen, id: &str) -> anyhow::Result<u64> {
    let c = gen.commune();
    let addr = gen.address(c);
    Ok(client
        .execute(
            "UPDATE citizens SET province_code = $2, commune_code = $3, address = $4, updated_at = now(), version = version + 1 WHERE citizen_id = $1",
            &[&id, &c.province, &c.code, &addr],
        )
        .await?)
}
