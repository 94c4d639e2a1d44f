//! The emulators themselves, over real HTTP, a file per provider group:
//! if they drift from the wire formats, every provider test lies.

mod acwing_qiita_github_nimbus;
mod google;
mod qq_wechat_weibo_gitee;
mod sandbox_github;
