//! The view: which pane is shown, the selection and filter of each, the object drilled
//! into, the last answers of the admin endpoint; keys change it, `draw` paints it. It never
//! waits on the network: answers arrive as `Round`s from the fetcher.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use ratatui::{
    crossterm::event::{KeyCode, KeyEvent, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Paragraph, Tabs},
    Frame,
};
use serde_json::Value;

use super::{
    fetch::{Round, Target, Wanted},
    model::{self, Table},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    Workloads,
    Connections,
    Services,
    Xds,
    Datapath,
}

impl Pane {
    pub const ALL: [Pane; 5] = [
        Pane::Workloads,
        Pane::Connections,
        Pane::Services,
        Pane::Xds,
        Pane::Datapath,
    ];

    fn index(self) -> usize {
        Pane::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }

    fn title(self) -> &'static str {
        match self {
            Pane::Workloads => "Workloads",
            Pane::Connections => "Connections",
            Pane::Services => "Services",
            Pane::Xds => "xDS",
            Pane::Datapath => "Datapath",
        }
    }
}

/// The object drilled into (`Enter`), and how far its text is scrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detail {
    pub target: Target,
    pub scroll: u16,
}

/// The last answers kept: a failed round keeps what the one before brought.
#[derive(Debug, Default)]
struct Data {
    workloads: Option<Value>,
    metrics: Option<String>,
    config_dump: Option<Value>,
    pod: Option<(String, Result<Value, String>)>,
    detail: Option<(Target, Result<Value, String>)>,
    /// Datapath counters of the last two rounds that had metrics, with when.
    counters: Option<(Instant, BTreeMap<String, u64>)>,
    counters_before: Option<(Instant, BTreeMap<String, u64>)>,
    refreshed: Option<SystemTime>,
    error: Option<String>,
}

pub struct App {
    admin: SocketAddr,
    interval_ms: u64,
    pub pane: Pane,
    selected: [usize; 5],
    filters: [String; 5],
    /// The filter being typed (`/`), applied on Enter.
    pub editing: Option<String>,
    pub detail: Option<Detail>,
    /// The workload whose connections the Connections pane lists (the one selected in
    /// Workloads).
    pod: Option<String>,
    data: Data,
    pub quit: bool,
}

/// `HH:MM:SS` UTC.
fn clock(t: SystemTime) -> String {
    let s = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl App {
    pub fn new(admin: SocketAddr, interval_ms: u64) -> App {
        App {
            admin,
            interval_ms,
            pane: Pane::Workloads,
            selected: [0; 5],
            filters: Default::default(),
            editing: None,
            detail: None,
            pod: None,
            data: Data::default(),
            quit: false,
        }
    }

    /// What the fetcher should ask for now.
    pub fn wanted(&self) -> Wanted {
        Wanted {
            config_dump: matches!(self.pane, Pane::Services | Pane::Xds),
            pod: self.pod.clone().filter(|_| self.pane == Pane::Connections),
            detail: self.detail.as_ref().map(|d| d.target.clone()),
        }
    }

    pub fn apply(&mut self, r: Round) {
        let d = &mut self.data;
        let mut errors = Vec::new();
        match r.workloads {
            Ok(v) => d.workloads = Some(v),
            Err(e) => errors.push(e),
        }
        match r.metrics {
            Ok(m) => {
                let now = model::datapath_counters(&m);
                // Rates over at least half an interval: a round asked at once (a pane
                // switched) a few ms after the last would make them noise.
                let half = std::time::Duration::from_millis(self.interval_ms / 2);
                match d.counters.take() {
                    Some((t, c)) if r.taken.saturating_duration_since(t) >= half => {
                        d.counters_before = Some((t, c));
                    }
                    // Too recent: the older baseline stays (none yet: this one is it).
                    Some(last) if d.counters_before.is_none() => d.counters_before = Some(last),
                    _ => {}
                }
                d.counters = Some((r.taken, now));
                d.metrics = Some(m);
            }
            Err(e) => errors.push(e),
        }
        match r.config_dump {
            Some(Ok(v)) => d.config_dump = Some(v),
            Some(Err(e)) => errors.push(e),
            None => {}
        }
        // A refused object (404: the pod is gone) is said in its pane, not as an outage.
        if let Some(p) = r.pod {
            d.pod = Some(p);
        }
        if let Some(x) = r.detail {
            d.detail = Some(x);
        }
        errors.dedup();
        if errors.is_empty() {
            d.refreshed = Some(r.at);
            d.error = None;
        } else {
            d.error = Some(errors.join("; "));
        }
        if self.pod.is_none() {
            self.pod = self.selected_workload();
        }
    }

    /// The rows of a pane before filtering, and a message when it has none to show.
    fn table(&self, pane: Pane) -> Result<Table, String> {
        let d = &self.data;
        let waiting = || "waiting for the admin endpoint...".to_owned();
        match pane {
            Pane::Workloads => d
                .workloads
                .as_ref()
                .map(model::workloads)
                .ok_or_else(waiting),
            Pane::Connections => {
                let Some(pod) = &self.pod else {
                    return Err("no workload selected (pick one in Workloads)".into());
                };
                match &d.pod {
                    Some((p, Ok(v))) if p == pod => Ok(model::connections(p, v)),
                    Some((p, Err(e))) if p == pod => Err(e.clone()),
                    _ => Err(format!("fetching the connections of {pod}...")),
                }
            }
            Pane::Services => d
                .workloads
                .as_ref()
                .map(|w| model::services(w, d.config_dump.as_ref()))
                .ok_or_else(waiting),
            Pane::Xds => {
                if d.config_dump.is_none() && d.metrics.is_none() {
                    return Err(waiting());
                }
                Ok(model::xds(d.config_dump.as_ref(), d.metrics.as_deref()))
            }
            Pane::Datapath => {
                let (t, now) = d.counters.as_ref().ok_or_else(waiting)?;
                let before = d
                    .counters_before
                    .as_ref()
                    .map(|(t0, c)| (c, t.duration_since(*t0).as_secs_f64()));
                Ok(model::datapath(now, before))
            }
        }
    }

    /// The rows shown: the pane's filter applied.
    fn visible(&self, pane: Pane) -> Vec<Vec<String>> {
        self.table(pane)
            .map(|t| {
                model::filtered(&t.rows, &self.filters[pane.index()])
                    .into_iter()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn selected_row(&self, pane: Pane) -> Option<Vec<String>> {
        let rows = self.visible(pane);
        let i = self.selected[pane.index()].min(rows.len().saturating_sub(1));
        rows.into_iter().nth(i)
    }

    fn selected_workload(&self) -> Option<String> {
        self.selected_row(Pane::Workloads).map(|r| r[0].clone())
    }

    /// Shows `pane` (leaving the joined view).
    fn switch(&mut self, pane: Pane) {
        self.detail = None;
        if pane == Pane::Connections {
            self.pod = self.selected_workload().or(self.pod.take());
        }
        self.pane = pane;
    }

    fn step(&mut self, by: isize) {
        if let Some(d) = &mut self.detail {
            d.scroll = d.scroll.saturating_add_signed(by as i16);
            return;
        }
        let n = self.visible(self.pane).len();
        let i = &mut self.selected[self.pane.index()];
        *i = (*i)
            .min(n.saturating_sub(1))
            .saturating_add_signed(by)
            .min(n.saturating_sub(1));
        if self.pane == Pane::Workloads {
            self.pod = self.selected_workload();
        }
    }

    fn enter(&mut self) {
        let target = match self.pane {
            Pane::Workloads => self.selected_workload().map(Target::Pod),
            Pane::Connections => self.pod.clone().map(Target::Pod),
            Pane::Services => self
                .selected_row(Pane::Services)
                .map(|r| Target::Service(r[0].clone())),
            Pane::Xds | Pane::Datapath => None,
        };
        if let Some(target) = target {
            self.detail = Some(Detail { target, scroll: 0 });
        }
    }

    pub fn key(&mut self, k: KeyEvent) {
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            self.quit = true;
            return;
        }
        if let Some(text) = &mut self.editing {
            match k.code {
                KeyCode::Enter => {
                    self.filters[self.pane.index()] = self.editing.take().unwrap_or_default();
                    self.selected[self.pane.index()] = 0;
                }
                KeyCode::Esc => {
                    self.editing = None;
                    self.filters[self.pane.index()].clear();
                }
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            return;
        }
        if self.detail.is_some() {
            match k.code {
                KeyCode::Esc | KeyCode::Enter | KeyCode::Backspace | KeyCode::Left => {
                    self.detail = None;
                    return;
                }
                KeyCode::PageDown => return self.step(10),
                KeyCode::PageUp => return self.step(-10),
                KeyCode::Home => {
                    if let Some(d) = &mut self.detail {
                        d.scroll = 0;
                    }
                    return;
                }
                _ => {}
            }
        }
        match k.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Tab => self.switch(Pane::ALL[(self.pane.index() + 1) % 5]),
            KeyCode::BackTab => self.switch(Pane::ALL[(self.pane.index() + 4) % 5]),
            KeyCode::Char(c @ '1'..='5') => {
                self.switch(Pane::ALL[c as usize - '1' as usize]);
            }
            KeyCode::Down | KeyCode::Char('j') => self.step(1),
            KeyCode::Up | KeyCode::Char('k') => self.step(-1),
            KeyCode::PageDown => self.step(10),
            KeyCode::PageUp => self.step(-10),
            KeyCode::Enter => self.enter(),
            KeyCode::Char('/') if self.detail.is_none() => {
                self.editing = Some(self.filters[self.pane.index()].clone());
            }
            KeyCode::Esc => self.filters[self.pane.index()].clear(),
            _ => {}
        }
    }

    pub fn draw(&self, f: &mut Frame) {
        let [tabs, body, help, status] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(3),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(f.area());
        let titles: Vec<String> = Pane::ALL
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{} {}", i + 1, p.title()))
            .collect();
        f.render_widget(
            Tabs::new(titles)
                .select(self.pane.index())
                .highlight_style(Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD)),
            tabs,
        );
        match &self.detail {
            Some(d) => self.draw_detail(f, body, d),
            None => self.draw_pane(f, body),
        }
        let help_line = match &self.editing {
            Some(t) => Line::from(vec![
                Span::styled("filter: /", Style::new().add_modifier(Modifier::BOLD)),
                Span::raw(t.clone()),
                Span::raw("_   (Enter applies, Esc clears)"),
            ]),
            None if self.detail.is_some() => {
                Line::raw("Up/Down/PgUp/PgDn scroll  Esc back  1-5 panes  q quit")
            }
            None => Line::raw(
                "Tab/Shift-Tab/1-5 panes  Up/Down/j/k move  Enter details  / filter  Esc clear filter  q quit",
            ),
        };
        f.render_widget(Paragraph::new(help_line), help);
        let mut spans = vec![Span::raw(format!(
            "admin {}  refreshed {}  every {} ms",
            self.admin,
            self.data
                .refreshed
                .map_or_else(|| "never".into(), |t| format!("{} UTC", clock(t))),
            self.interval_ms
        ))];
        if let Some(e) = &self.data.error {
            spans.push(Span::styled(
                format!("  error (showing the last data): {e}"),
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ));
        }
        f.render_widget(
            Paragraph::new(Line::from(spans)).style(Style::new().add_modifier(Modifier::REVERSED)),
            status,
        );
    }

    fn draw_pane(&self, f: &mut Frame, area: Rect) {
        let filter = &self.filters[self.pane.index()];
        let mut title = format!(" {} ", self.pane.title());
        if !filter.is_empty() {
            title += &format!("[filter: {filter}] ");
        }
        let block = Block::bordered().title(title);
        let inner = block.inner(area);
        f.render_widget(block, area);
        let table = match self.table(self.pane) {
            Ok(t) => t,
            Err(msg) => {
                f.render_widget(Paragraph::new(msg), inner);
                return;
            }
        };
        let rows = model::filtered(&table.rows, filter);
        let widths: Vec<usize> = (0..table.columns.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                    .chain([table.columns[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<String>| -> String {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        let caption = if filter.is_empty() {
            table.caption.clone()
        } else {
            format!("{} ({} match the filter)", table.caption, rows.len())
        };
        let mut lines = vec![
            Line::raw(caption),
            Line::styled(
                format!(
                    "  {}",
                    line(table.columns.iter().map(|c| c.to_uppercase()).collect())
                ),
                Style::new().add_modifier(Modifier::BOLD),
            ),
        ];
        // Keep the selected row in sight.
        let room = (inner.height as usize).saturating_sub(lines.len()).max(1);
        let selected = self.selected[self.pane.index()].min(rows.len().saturating_sub(1));
        let first = (selected + 1).saturating_sub(room);
        for (i, r) in rows.iter().enumerate().skip(first).take(room) {
            let text = line((*r).clone());
            let selectable = matches!(
                self.pane,
                Pane::Workloads | Pane::Services | Pane::Connections
            );
            lines.push(if i == selected && selectable {
                Line::styled(
                    format!("> {text}"),
                    Style::new().add_modifier(Modifier::REVERSED),
                )
            } else {
                Line::raw(format!("  {text}"))
            });
        }
        f.render_widget(Paragraph::new(lines), inner);
    }

    fn draw_detail(&self, f: &mut Frame, area: Rect, d: &Detail) {
        let block = Block::bordered().title(format!(" {} (Esc: back) ", d.target.label()));
        let text = match &self.data.detail {
            Some((t, Ok(v))) if *t == d.target => crate::admin::inspect::render_text(v),
            Some((t, Err(e))) if *t == d.target => e.clone(),
            _ => format!("fetching {}...", d.target.path()),
        };
        f.render_widget(
            Paragraph::new(text).block(block).scroll((d.scroll, 0)),
            area,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratatui::{backend::TestBackend, crossterm::event::KeyEvent, Terminal};
    use serde_json::json;

    use super::*;

    fn press(app: &mut App, keys: &str) {
        for c in keys.chars() {
            app.key(KeyEvent::from(match c {
                '\n' => KeyCode::Enter,
                '\t' => KeyCode::Tab,
                '\x1b' => KeyCode::Esc,
                c => KeyCode::Char(c),
            }));
        }
    }

    fn screen(app: &App) -> String {
        let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
        t.draw(|f| app.draw(f)).unwrap();
        let b = t.backend().buffer();
        (0..b.area.height)
            .map(|y| {
                (0..b.area.width)
                    .map(|x| b[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn round(metrics: &str, at: Instant) -> Round {
        Round {
            at: UNIX_EPOCH + Duration::from_secs(3600 * 10 + 61),
            taken: at,
            workloads: Ok(json!({"workloads": [
                {"namespace": "shop", "name": "client", "ip": "10.0.0.2", "enrolled": true},
                {"namespace": "backend", "name": "server", "ip": "10.0.0.3", "enrolled": true},
            ], "services": []})),
            metrics: Ok(metrics.into()),
            config_dump: None,
            pod: None,
            detail: None,
        }
    }

    #[test]
    fn keys_move_filter_switch_and_drill_down() {
        let mut app = App::new("127.0.0.1:15020".parse().unwrap(), 1000);
        let t0 = Instant::now();
        app.apply(round(
            "mesh_datapath_events_total{event=\"connect_redirected\"} 1\n",
            t0,
        ));
        let s = screen(&app);
        assert!(s.contains("> shop/client"), "{s}");
        assert!(s.contains("refreshed 10:01:01 UTC"), "{s}");
        // Down selects the server; its connections are the ones wanted.
        press(&mut app, "j");
        assert!(screen(&app).contains("> backend/server"));
        press(&mut app, "2");
        assert_eq!(app.wanted().pod.as_deref(), Some("backend/server"));
        press(&mut app, "1k\n");
        assert_eq!(app.wanted().detail, Some(Target::Pod("shop/client".into())));
        assert!(screen(&app).contains("pod shop/client (Esc: back)"));
        press(&mut app, "\x1b");
        assert!(app.detail.is_none());
        // Another pane leaves the joined view too.
        press(&mut app, "\n\t");
        assert!(app.detail.is_none());
        assert_eq!(app.pane, Pane::Connections);
        press(&mut app, "1");
        // A filter narrows the list once applied; Esc clears it.
        press(&mut app, "/serv");
        assert_eq!(
            app.visible(Pane::Workloads).len(),
            2,
            "not applied while typed"
        );
        press(&mut app, "\n");
        let s = screen(&app);
        assert!(
            s.contains("backend/server") && !s.contains("shop/client"),
            "{s}"
        );
        assert!(s.contains("[filter: serv]"), "{s}");
        press(&mut app, "/\x1b");
        assert_eq!(app.visible(Pane::Workloads).len(), 2);
        // The Datapath pane: counters, then rates between rounds.
        app.apply(round(
            "mesh_datapath_events_total{event=\"connect_redirected\"} 5\n",
            t0 + Duration::from_secs(2),
        ));
        press(&mut app, "\t\t\t\t");
        assert_eq!(app.pane, Pane::Datapath);
        let s = screen(&app);
        assert!(s.contains("connect_redirected  5      2.0"), "{s}");
        assert!(app.wanted().pod.is_none() && !app.wanted().config_dump);
        press(&mut app, "q");
        assert!(app.quit);
    }

    #[test]
    fn an_unreachable_agent_is_said_and_the_last_data_stays() {
        let mut app = App::new("127.0.0.1:1".parse().unwrap(), 500);
        app.apply(round("", Instant::now()));
        app.apply(Round {
            workloads: Err("connection refused".into()),
            metrics: Err("connection refused".into()),
            ..round("", Instant::now())
        });
        let s = screen(&app);
        assert!(
            s.contains("error (showing the last data): connection refused"),
            "{s}"
        );
        assert!(s.contains("shop/client"), "{s}");
        let mut ctrl_c = KeyEvent::from(KeyCode::Char('c'));
        ctrl_c.modifiers = KeyModifiers::CONTROL;
        app.editing = Some("x".into());
        app.key(ctrl_c);
        assert!(app.quit);
    }
}
