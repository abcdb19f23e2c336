-- deduct_points' fast path without its two lookups, and its lots drawn by one short statement each
-- (issue 2 and issue 6 benchmarks).
--
-- Measured with callgrind (instructions, the same for the same work whatever else the machine does):
-- benchmarks/instructions.py, a single-user backend running the deductions as prepared statements.
--
-- 1. The fast path's WHERE clause looked up max_operation_amount in ledger_settings and the type in
--    ledger_transaction_types: two subqueries, each an index scan the executor set up and tore down on
--    every call (~44k of ~640k instructions per deduction; the constants below take ~14k of it back,
--    so -30k). The two values now come from two SQL
--    functions whose bodies are constants, written from the tables by ledger_compile_fast_path() whenever
--    either table changes (triggers below). PostgreSQL inlines an IMMUTABLE SQL function into the plan
--    and folds it, and a cached plan that inlined a function is invalidated when the function is
--    replaced, so a session's next deduction plans with the new value (tests/test_fast_path_constants.py
--    lowers the maximum under a session with a warm plan). The tables stay the truth: the slow path
--    (ledger_validate) reads them as before, and a value the functions lack (a type added by hand with
--    the triggers disabled) only sends the call down the slow path. A missing max_operation_amount
--    compiles to 0, which no amount passes: every call then takes the slow path, which answers from the
--    table as it always has (ledger_validate applies no maximum it cannot read).
--    Declaring a function IMMUTABLE whose body changes is the point here: the body changes only by
--    CREATE OR REPLACE, which is what invalidates the plans.
-- 2. The first lot is drawn by an UPDATE whose target is a scalar subquery (an InitPlan) and whose
--    RETURNING reads the row's old remaining (PostgreSQL 18's OLD), not by a join with a subquery:
--    fewer plan nodes to start (~18k instructions). When it does not cover the amount, the same
--    statement (for the rest) runs again, one lot at a time, instead of 018's statement that read four
--    lots through a window function: a crossing draw is nearly always one lot more, and one short
--    statement is cheaper than the window, its sort and the two ordered aggregates (many-lot deduction
--    ~790k -> ~741k instructions before sql/020, single-lot unchanged). What is written is 018's: lot_id for one lot,
--    lot_ids / lot_amounts for several, points_lot_consumptions for a draw the lots cannot cover.
-- Concurrency is 011's: the balance row lock, taken first by the balance UPDATE in a statement of its
-- own, is held by every writer of the user's lots; each lot statement after it reads with a fresh
-- snapshot (READ COMMITTED) and sees the lots this call drew before it.

CREATE FUNCTION public.ledger_max_operation_amount() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $f$ SELECT 0::bigint $f$;
CREATE FUNCTION public.ledger_is_debit_type(p_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $f$ SELECT false $f$;
COMMENT ON FUNCTION public.ledger_max_operation_amount() IS
    'ledger_settings.max_operation_amount as a constant for deduct_points'' fast path; written by '
    'ledger_compile_fast_path() (do not edit)';
COMMENT ON FUNCTION public.ledger_is_debit_type(text) IS
    'the ledger_transaction_types a deduction may use (direction 0 or -1), as a constant list for '
    'deduct_points'' fast path; written by ledger_compile_fast_path() (do not edit)';

-- Not SECURITY DEFINER: it runs as whoever writes the two tables (the migrating user, who owns the
-- functions; no one else may write them), so it needs no rights of its own to replace the functions.
-- A body that is already what the tables say is left alone: no DDL, no plan invalidated.
CREATE FUNCTION public.ledger_compile_fast_path() RETURNS void
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_max bigint;
    v_types text[];
    v_body text;
BEGIN
    -- concurrent writers of the settings (two `credits migrate` at once) replace the functions in turn
    PERFORM pg_advisory_xact_lock(hashtext('credit-recon:ledger_compile_fast_path'));
    SELECT s.value::bigint INTO v_max FROM public.ledger_settings s WHERE s.name = 'max_operation_amount';
    SELECT coalesce(array_agg(tt.name ORDER BY tt.name), '{}') INTO v_types
      FROM public.ledger_transaction_types tt WHERE tt.direction IN (0, -1);
    v_body := format('SELECT %s::bigint', coalesce(v_max, 0));
    IF v_body IS DISTINCT FROM (SELECT p.prosrc FROM pg_catalog.pg_proc p
                                 WHERE p.oid = 'public.ledger_max_operation_amount()'::pg_catalog.regprocedure) THEN
        EXECUTE format('CREATE OR REPLACE FUNCTION public.ledger_max_operation_amount() RETURNS bigint '
                       'LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L', v_body);
    END IF;
    v_body := format('SELECT p_type = ANY (%L::text[])', v_types);
    IF v_body IS DISTINCT FROM (SELECT p.prosrc FROM pg_catalog.pg_proc p
                                 WHERE p.oid = 'public.ledger_is_debit_type(text)'::pg_catalog.regprocedure) THEN
        EXECUTE format('CREATE OR REPLACE FUNCTION public.ledger_is_debit_type(p_type text) RETURNS boolean '
                       'LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L', v_body);
    END IF;
END $$;

CREATE FUNCTION public.ledger_compile_fast_path_trigger() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    PERFORM public.ledger_compile_fast_path();
    RETURN NULL;
END $$;

-- statement-level: a migration or `credits migrate` writes these tables a few rows at a time, rarely
CREATE TRIGGER ledger_settings_compile_fast_path
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.ledger_settings
    FOR EACH STATEMENT EXECUTE FUNCTION public.ledger_compile_fast_path_trigger();
CREATE TRIGGER ledger_transaction_types_compile_fast_path
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.ledger_transaction_types
    FOR EACH STATEMENT EXECUTE FUNCTION public.ledger_compile_fast_path_trigger();

SELECT public.ledger_compile_fast_path();

REVOKE EXECUTE ON FUNCTION public.ledger_compile_fast_path() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.ledger_compile_fast_path_trigger() FROM PUBLIC;

-- 018's deduct_points with the two lookups replaced by the compiled constants and the lots drawn one
-- statement each (above); everything else -- the fast path's other conditions, what the row records,
-- the fallback through ledger_validate / ledger_apply, the undo when the key is taken, the replay -- as
-- 018 wrote it.
CREATE OR REPLACE FUNCTION public.deduct_points(p_user_id uuid, p_amount bigint, p_transaction_type text,
                                                p_description text, p_idempotency_key text DEFAULT NULL,
                                                p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_new bigint;
    v_id bigint;
    v_lot bigint;        -- the first lot drawn
    v_had bigint;        -- what it gave
    v_ids bigint[];      -- several lots: every lot drawn, in draw order
    v_ns bigint[];       -- and how much each gave
    v_left bigint;       -- still to draw
    v_at timestamptz;
BEGIN
    IF p_user_id IS NOT NULL AND p_amount > 0 AND length(p_idempotency_key) BETWEEN 1 AND 512 THEN
        UPDATE public.points_balances b
           SET balance = b.balance - p_amount, lifetime_spent = b.lifetime_spent + p_amount, updated_at = now()
         WHERE b.user_id = p_user_id
           AND b.reserved = 0
           AND b.balance >= p_amount
           AND (b.next_expiry IS NULL OR b.next_expiry > now())
           AND p_amount <= public.ledger_max_operation_amount()
           AND public.ledger_is_debit_type(p_transaction_type)
        RETURNING b.balance INTO v_new;

        IF v_new IS NOT NULL THEN
            -- the first open lot in consumption order gives what it has, up to the amount
            UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, p_amount)
             WHERE l.id = (SELECT x.id FROM public.points_lots x
                            WHERE x.user_id = p_user_id AND NOT x.spent AND x.remaining > 0
                            ORDER BY x.priority, x.expires_at, x.id LIMIT 1)
            RETURNING l.id, least(old.remaining, p_amount) INTO v_lot, v_had;
            v_left := p_amount - v_had;
            IF v_left > 0 THEN
                -- several lots: the next ones in the same order, a statement each, until the rest is covered
                v_ids := ARRAY[v_lot];
                v_ns := ARRAY[v_had];
                LOOP
                    UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, v_left)
                     WHERE l.id = (SELECT x.id FROM public.points_lots x
                                    WHERE x.user_id = p_user_id AND NOT x.spent AND x.remaining > 0
                                    ORDER BY x.priority, x.expires_at, x.id LIMIT 1)
                    RETURNING l.id, least(old.remaining, v_left) INTO v_lot, v_had;
                    EXIT WHEN v_lot IS NULL;  -- no open lot left: the rest is uncovered (below)
                    v_ids := v_ids || v_lot;
                    v_ns := v_ns || v_had;
                    v_left := v_left - v_had;
                    EXIT WHEN v_left = 0;
                END LOOP;
                v_lot := NULL;
            ELSE
                v_left := 0;  -- covered by one lot, or no open lot at all (the lots trigger records that)
            END IF;
            -- one lot: lot_id; several: lot_ids / lot_amounts; lots that ran out: itemised below with the
            -- uncovered rest; no lot at all: lot_id and lots_drawn NULL, and the lots trigger records it
            INSERT INTO public.points_transactions AS t
                (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata,
                 lot_id, lots_drawn, lot_ids, lot_amounts)
            VALUES (p_user_id, -p_amount, v_new, p_transaction_type, p_description, p_idempotency_key,
                    coalesce(p_metadata, '{}'::jsonb), v_lot, CASE WHEN v_ids IS NOT NULL THEN true END,
                    CASE WHEN v_left = 0 THEN v_ids END, CASE WHEN v_left = 0 THEN v_ns END)
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING t.id, t.created_at INTO v_id, v_at;
            IF v_id IS NOT NULL AND v_left > 0 THEN
                INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
                SELECT v_id, x.lot_id, p_user_id, x.n, v_at
                  FROM unnest(v_ids || NULL::bigint, v_ns || v_left) AS x (lot_id, n);
            END IF;

            IF v_id IS NOT NULL THEN
                new_balance := v_new;
                transaction_id := v_id;
                duplicate := false;
                RETURN NEXT;
                RETURN;
            END IF;

            -- the key is taken: undo the balance and the draws (the rows are still locked by us)
            UPDATE public.points_balances b
               SET balance = b.balance + p_amount, lifetime_spent = b.lifetime_spent - p_amount
             WHERE b.user_id = p_user_id;
            IF v_ids IS NULL THEN
                UPDATE public.points_lots l SET remaining = l.remaining + p_amount WHERE l.id = v_lot;
            ELSE
                UPDATE public.points_lots l SET remaining = l.remaining + x.n
                  FROM unnest(v_ids, v_ns) AS x (id, n)
                 WHERE l.id = x.id;
            END IF;
            RETURN QUERY SELECT * FROM public.ledger_replay(p_idempotency_key, p_user_id, -p_amount,
                                                            p_transaction_type);
            RETURN;
        END IF;
    END IF;

    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, (-1)::smallint, p_idempotency_key);
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, -p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, p_metadata);
END $$;

REVOKE EXECUTE ON FUNCTION public.deduct_points(uuid, bigint, text, text, text, jsonb) FROM PUBLIC;
