//! The transfer workload: MULTI/EXEC transactions moving amounts between accounts, each one
//! also appending its id to a ledger list, and transactions reading every account and the ledger
//! at once. Two things are checked:
//! - the ledger is an ordinary list-append history (see `checker::check_list_append`): every
//!   acknowledged transfer is in it once, no failed one is, reads are prefixes of each other;
//! - every snapshot's balances are exactly what its ledger adds up to. A transfer applied in part,
//!   or a read that saw some of a transfer and not the rest, breaks that.
//!
//! A transfer's accounts and amount follow from its id, so a ledger alone says what the balances
//! must be. Like the list workload, transfers move on to a fresh set of accounts and ledger every
//! [`CHUNK`] ids, which keeps ledgers (and the checker's work) small however long a run is.

use crate::history::Op;

/// Transfer ids per set of accounts and ledger.
pub const CHUNK: i64 = 200;
/// Accounts per chunk.
pub const ACCOUNTS: i64 = 3;

/// The chunk a transfer id belongs to.
pub fn chunk_of(id: i64) -> i64 {
    id / CHUNK
}

pub fn ledger_key(chunk: i64) -> String {
    format!("t{chunk}")
}

fn account_key(chunk: i64, account: i64) -> String {
    format!("a{chunk}:{account}")
}

/// What transfer `id` does: from one account to another of its chunk, a small amount.
pub fn transfer_of(id: i64) -> (i64, i64, i64) {
    let from = id % ACCOUNTS;
    let to = (from + 1 + (id / ACCOUNTS) % (ACCOUNTS - 1)) % ACCOUNTS;
    (from, to, 1 + id % 5)
}

/// Transfer `id`, as one transaction; recorded as an append of `id` to its ledger.
pub fn transfer(id: i64) -> (Op, redis::Pipeline) {
    let chunk = chunk_of(id);
    let (from, to, amount) = transfer_of(id);
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("INCRBY")
        .arg(account_key(chunk, from))
        .arg(-amount)
        .ignore()
        .cmd("INCRBY")
        .arg(account_key(chunk, to))
        .arg(amount)
        .ignore()
        .cmd("RPUSH")
        .arg(ledger_key(chunk))
        .arg(id)
        .ignore();
    (Op::Append { key: ledger_key(chunk), value: id }, pipe)
}

/// Every account of `chunk` and its ledger, as one transaction; recorded as a read of the ledger.
pub fn snapshot(chunk: i64) -> (Op, redis::Pipeline) {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for account in 0..ACCOUNTS {
        pipe.cmd("GET").arg(account_key(chunk, account));
    }
    pipe.cmd("LRANGE").arg(ledger_key(chunk)).arg(0).arg(-1);
    (Op::ReadList { key: ledger_key(chunk) }, pipe)
}

/// The ledger a snapshot of `chunk` read, once its balances are checked against it; or what is
/// wrong with it.
pub fn check_snapshot(chunk: i64, reply: &redis::Value) -> Result<Vec<i64>, String> {
    let redis::Value::Bulk(items) = reply else { return Err(format!("not an array: {reply:?}")) };
    let [balances @ .., redis::Value::Bulk(ledger)] = items.as_slice() else {
        return Err(format!("no ledger at the end: {reply:?}"));
    };
    let int = |v: &redis::Value| -> Result<i64, String> {
        match v {
            redis::Value::Nil => Ok(0),
            redis::Value::Data(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).ok_or(format!("not a number: {v:?}")),
            other => Err(format!("not a number: {other:?}")),
        }
    };
    let balances = balances.iter().map(int).collect::<Result<Vec<_>, _>>()?;
    let ledger = ledger.iter().map(int).collect::<Result<Vec<_>, _>>()?;
    if balances.len() != ACCOUNTS as usize {
        return Err(format!("{} balances for {ACCOUNTS} accounts", balances.len()));
    }
    let mut expected = vec![0; ACCOUNTS as usize];
    for &id in &ledger {
        if chunk_of(id) != chunk {
            return Err(format!("ledger {} holds transfer {id} of another chunk", ledger_key(chunk)));
        }
        let (from, to, amount) = transfer_of(id);
        expected[from as usize] -= amount;
        expected[to as usize] += amount;
    }
    if balances != expected {
        return Err(format!(
            "chunk {chunk}: balances {balances:?} but the ledger read with them ({} transfers) adds up to {expected:?}",
            ledger.len()
        ));
    }
    Ok(ledger)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn reply(balances: &[Option<i64>], ledger: &[i64]) -> Value {
        let mut items: Vec<Value> = balances.iter().map(|b| b.map_or(Value::Nil, |b| Value::Data(b.to_string().into_bytes()))).collect();
        items.push(Value::Bulk(ledger.iter().map(|id| Value::Data(id.to_string().into_bytes())).collect()));
        Value::Bulk(items)
    }

    #[test]
    fn a_transfer_moves_an_amount_between_two_different_accounts_of_its_chunk() {
        for id in 0..1000 {
            let (from, to, amount) = transfer_of(id);
            assert!(from != to && (0..ACCOUNTS).contains(&from) && (0..ACCOUNTS).contains(&to), "{id}");
            assert!(amount > 0);
        }
    }

    #[test]
    fn balances_must_add_up_to_the_ledger_read_with_them() {
        assert_eq!(check_snapshot(0, &reply(&[None, None, None], &[])), Ok(vec![]));
        let ledger = [0, 1, 2, 3];
        let mut balances = [0; 3];
        for id in ledger {
            let (from, to, amount) = transfer_of(id);
            balances[from as usize] -= amount;
            balances[to as usize] += amount;
        }
        let whole: Vec<Option<i64>> = balances.iter().map(|b| Some(*b)).collect();
        assert_eq!(check_snapshot(0, &reply(&whole, &ledger)), Ok(ledger.to_vec()));
        // Transfer 3 half applied: its debit without its ledger entry.
        let err = check_snapshot(0, &reply(&whole, &ledger[..3])).unwrap_err();
        assert!(err.contains("adds up to"), "{err}");
        // A transfer of another chunk in this ledger.
        assert!(check_snapshot(1, &reply(&whole, &ledger)).is_err());
        assert!(check_snapshot(0, &Value::Nil).is_err());
    }
}
