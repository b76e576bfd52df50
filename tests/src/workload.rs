//! Workloads that count the row changes they make, so a scenario can assert the hub applied each
//! exactly once.

use tokio_postgres::Client;

use crate::citizens::{communes, insert_citizens, move_citizen, CitizenGen};

/// Inserts `n` rows in ONE transaction, built in SQL (every type, NULLs, diacritics, odd array text).
pub async fn big_insert_txn(client: &Client, first: u64, n: u64) -> anyhow::Result<u64> {
    let picks: Vec<String> =
        communes().iter().step_by(97).take(20).map(|c| format!("'{}:{}'", c.province, c.code)).collect();
    let sql = format!(
        "WITH picks AS (SELECT ARRAY[{picks}] AS a)
         INSERT INTO citizens (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind,
                               registered_at, household_id, income, score, active, photo, profile, tags, phones, note)
         SELECT lpad(({first} + g)::text, 12, '0'), 'Trần Thị Bích ' || g, DATE '1960-01-01' + g % 15000, g % 2,
                split_part(a[1 + g % 20], ':', 1), split_part(a[1 + g % 20], ':', 2),
                'Số ' || g || ' đường Nguyễn Huệ', 'tạm trú',
                TIMESTAMP '2021-03-04 05:06:07.123456' + g * interval '1 second', md5(g::text)::uuid,
                (g * 1.37)::numeric(14,2), g / 3.0, g % 2 = 0, decode(md5(g::text), 'hex'),
                jsonb_build_object('g', g, 'tên', 'Bích'), ARRAY['a,b', 'c\"d', NULL, 'x\\y'], ARRAY[g, g + 1]::bigint[],
                CASE WHEN g % 7 = 0 THEN NULL ELSE 'ghi chú ' || g END
         FROM generate_series(1, {n}) g, picks",
        picks = picks.join(", ")
    );
    Ok(client.execute(&sql, &[]).await?)
}

/// A mixed run of small transactions over `ids`: inserts, residence moves, key changes and deletes.
/// Returns the row changes made. `ids` is kept up to date.
pub async fn mixed_small_txns(
    client: &Client,
    gen: &mut CitizenGen,
    ids: &mut Vec<String>,
    rounds: usize,
) -> anyhow::Result<u64> {
    let mut changes = 0;
    for round in 0..rounds {
        let new = insert_citizens(client, gen, 20).await?;
        changes += new.len() as u64;
        ids.extend(new);
        for _ in 0..20 {
            let i = gen.below(ids.len());
            let id = ids[i].clone();
            changes += move_citizen(client, gen, &id).await?;
        }
        // A key change: the record is re-keyed (e.g. a corrected id).
        let i = gen.below(ids.len());
        let old = ids[i].clone();
        let new_id = gen.citizen_id();
        let n = client.execute("UPDATE citizens SET citizen_id = $2 WHERE citizen_id = $1", &[&old, &new_id]).await?;
        if n == 1 {
            ids[i] = new_id;
        }
        changes += n;
        if round % 2 == 0 {
            let i = gen.below(ids.len());
            let id = ids.swap_remove(i);
            changes += client.execute("DELETE FROM citizens WHERE citizen_id = $1", &[&id]).await?;
        }
    }
    Ok(changes)
}
