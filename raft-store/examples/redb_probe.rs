use redb::{Database, Durability, TableDefinition};
use std::time::Instant;
const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("x.redb")).unwrap();
    for (name, d) in [("immediate", Durability::Immediate), ("none", Durability::None)] {
        let n = 500u64;
        let t0 = Instant::now();
        for i in 0..n {
            let mut w = db.begin_write().unwrap();
            w.set_durability(d).unwrap();
            w.open_table(T).unwrap().insert(i, [7u8; 300].as_slice()).unwrap();
            w.commit().unwrap();
        }
        println!("{name}: {:.3} ms/commit", t0.elapsed().as_secs_f64() * 1000.0 / n as f64);
    }
}
